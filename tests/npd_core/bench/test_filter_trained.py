"""The filter study's trained stage on hand-made results: its cells as docs/filter.md lists them,
the random drop matched to its fence cell, and the pre-registered decision (the runs are
`npd bench`'s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.bench import bench_app
from npd_core.bench import filter_trained as ft
from npd_core.config import NPDConfig, merge
from npd_core.errors import ConfigError

DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_the_two_best_junk_scores_come_from_the_junk_stage():
    summary = json.loads((DOCS / "filter-junk.json").read_text())["summary"]
    assert ft.best_scores(summary) == ["learner_ratio", "teacher_nll"]
    flat = {s: {"all": {"mean": 0.5}} for s in ft.SCORES}
    assert ft.best_scores(flat) == ["delta_ifd", "delta_ifd_ratio"]  # ties: the table's order
    with pytest.raises(ConfigError, match="no \\['learner_ratio'\\]"):
        ft.best_scores({s: v for s, v in flat.items() if s != "learner_ratio"})


def test_cells_as_the_rule_lists_them():
    cells = ft.trained_cells(["learner_ratio", "teacher_nll"])
    assert len(cells) == 60 and len({c.name for c in cells}) == 60
    assert {(c.junk, c.seed) for c in cells} == {(j, s) for j in ft.JUNK for s in range(3)}
    group = [c for c in cells if (c.junk, c.seed) == ("junk", 1)]
    assert [(c.rule, c.score) for c in group] == [
        ("none-keep", None),
        ("fence", "learner_ratio"),
        ("random", "learner_ratio"),
        ("fence", "teacher_nll"),
        ("random", "teacher_nll"),
        ("fence", "conditional"),
        ("random", "conditional"),
        ("band", "learner_ratio"),
        ("band", "teacher_nll"),
        ("band", "conditional"),
    ]
    names = [c.name for c in cells]
    for c in cells:  # a random cell runs after the fence cell it copies
        if c.matches:
            assert names.index(c.matches) < names.index(c.name)
    assert group[2].matches == "fence-learner_ratio-junk-s1"
    assert len(ft.trained_cells(["conditional", "teacher_nll"])) == 2 * 3 * 7


def _config(cell: ft.TrainedCell, shares=None) -> NPDConfig:
    return NPDConfig.model_validate(
        merge(NPDConfig().model_dump(mode="json"), cell.overrides(shares))
    )


def test_each_cells_config():
    fence_lr = _config(ft.TrainedCell("fence", "learner_ratio", "junk", 0))
    assert fence_lr.staleness == 4 and fence_lr.generate.plant_junk == 0.15
    f = fence_lr.filter
    assert (f.rule, f.score, f.k, f.sides, f.drop_unfinished) == (
        "fence", "learner_ratio", 3.0, "both", False
    )  # fmt: skip
    assert f.weighs_steps and ft.in_steps(ft.TrainedCell("fence", "learner_ratio", "junk", 0))
    f = _config(ft.TrainedCell("fence", "teacher_nll", "clean", 0)).filter
    assert (f.sides, f.score) == ("high", "teacher_nll")
    cfg = _config(ft.TrainedCell("band", "delta_ifd_ratio", "clean", 2))
    assert cfg.generate.plant_junk == 0.0
    assert (cfg.filter.q_low, cfg.filter.q_high, cfg.filter.ifd_form) == (0.05, 0.90, "ratio")
    ref = _config(ft.TrainedCell("none-keep", None, "junk", 0)).filter
    assert (ref.rule, ref.drop_unfinished) == ("none", False)
    # the random drop copies its fence cell's shares (read back from JSON: string keys)
    rand = ft.TrainedCell("random", "teacher_nll", "junk", 0)
    f = _config(rand, {"1": 0.9, "2": 0.8}).filter
    assert (f.rule, f.keep, f.keep_by_round) == ("random", pytest.approx(0.85), {1: 0.9, 2: 0.8})
    with pytest.raises(ConfigError, match="no kept shares of fence-teacher_nll-junk-s0"):
        rand.overrides({})


def _cells(finals: dict[tuple[str, str | None, str], list[float]]) -> list[dict]:
    return [
        {"rule": r, "score": s, "junk": j, "seed": i, "final_score": v}
        for (r, s, j), vs in finals.items()
        for i, v in enumerate(vs)
    ]


BASE = {
    ("none-keep", None, "clean"): [60.0, 61.0, 62.0],
    ("none-keep", None, "junk"): [50.0, 51.0, 52.0],
    ("fence", "learner_ratio", "junk"): [58.0, 59.0, 60.0],
    ("random", "learner_ratio", "junk"): [50.0, 51.0, 52.5],
    ("fence", "conditional", "junk"): [51.0, 50.0, 52.0],
    ("random", "conditional", "junk"): [50.5, 51.0, 51.5],
    ("fence", "learner_ratio", "clean"): [59.5, 60.5, 61.0],
    ("fence", "conditional", "clean"): [60.0, 61.0, 62.0],
    ("band", "learner_ratio", "junk"): [70.0, 71.0, 72.0],
    ("band", "learner_ratio", "clean"): [61.0, 61.0, 61.0],
    ("band", "conditional", "junk"): [50.0, 50.5, 51.0],
}


def test_the_decision_recommends_a_score_that_beats_both_and_costs_little():
    d = ft.decide(_cells(BASE))
    assert d["recommended"] == [
        {"score": "learner_ratio", "rule": "fence", "junk_final": pytest.approx(59.0)}
    ]
    c = d["comparisons"]["fence-learner_ratio"]
    assert c["vs_random_ci95"][0] > 0 and c["vs_conditional_ci95"][0] > 0
    assert c["clean_vs_reference"] == pytest.approx(-2 / 3)
    # the band beats conditional by far, but has no matched random drop
    band = d["comparisons"]["band-learner_ratio"]
    assert band["beats_conditional"] and not band["beats_random"] and not band["recommended"]
    cond = d["comparisons"]["fence-conditional"]  # only its random drop counts: within noise
    assert cond["vs_conditional_ci95"] is None and not cond["recommended"]


def test_the_decision_refuses_a_score_the_random_drop_matches():
    finals = {**BASE, ("random", "learner_ratio", "junk"): [57.5, 59.0, 60.5]}
    d = ft.decide(_cells(finals))
    c = d["comparisons"]["fence-learner_ratio"]
    assert c["beats_conditional"] and not c["beats_random"] and d["recommended"] == []


def test_the_decision_refuses_a_score_that_costs_more_than_a_point_without_junk():
    finals = {**BASE, ("fence", "learner_ratio", "clean"): [59.0, 59.8, 60.0]}
    d = ft.decide(_cells(finals))
    c = d["comparisons"]["fence-learner_ratio"]
    assert c["clean_vs_reference"] == pytest.approx(-1.4)
    assert c["beats_random"] and c["beats_conditional"] and not c["costs_at_most_1"]
    assert d["recommended"] == []


def test_summary_and_plotted_means():
    cells = _cells(BASE)
    for c in cells:
        c.update(kept_share=0.9, junk_kept_share=None, rounds=[{"round": 1, "score": 50.0}])
    rows = ft.summary(cells)
    assert len(rows) == len(BASE) and all(r["seeds"] == 3 for r in rows)
    assert rows[0]["junk_kept_share"] is None and rows[0]["kept_share"] == pytest.approx(0.9)
    means = ft.plotted_means(cells, "junk")
    assert "none-keep" in means and means["fence-learner_ratio"] == [(1, 50.0)]


def test_the_trained_stage_needs_the_junk_stage(tmp_path):
    res = CliRunner().invoke(bench_app, ["filter", "--stage", "trained", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "run `npd bench filter --stage junk --run RUN_ID` first" in str(res.exception)
