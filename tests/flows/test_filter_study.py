"""The filter study's plan and decision rule, on hand-made results (the runs are `npd bench`'s)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.bench import bench_app
from npd_core.bench.filter_study import (
    REFERENCE,
    RULES,
    confirm_cells,
    confirm_rules,
    curve_figures,
    decide,
    screen_cells,
    summary,
)


def _cell(rule, st, seed, final, **kw):
    return dict(
        rule=rule, staleness=st, seed=seed, final_score=final, max_drop=0.0, kept_fraction=1.0,
        dropped_kl_share=0.0, rounds=[{}] * 4, **kw,
    )  # fmt: skip


def test_screen_and_confirm_grids():
    screen = screen_cells()
    assert len(screen) == 12 and {c.seed for c in screen} == {0}
    assert {(c.staleness, c.budget_fraction) for c in screen} == {(1, 0.25), (4, 1.0)}
    assert {c.rule for c in screen} == set(RULES)
    done = [_cell(c.rule, c.staleness, 0, 50.0) for c in screen]
    for c in done:  # means over staleness: upper 60, fence 58.5, then the rest at 50
        c["final_score"] = {"upper": 60.0, "fence": 57.0 + c["staleness"] / 2}.get(c["rule"], 50.0)
    assert confirm_rules(done) == ["upper", "fence", REFERENCE]
    ties = [_cell(c.rule, c.staleness, 0, 50.0) for c in screen]
    assert confirm_rules(ties) == ["band", "fence", REFERENCE]  # ties: RULES order
    cells = confirm_cells(["upper", "fence", REFERENCE])
    assert len(cells) == 27 and all(c.budget_fraction == 1.0 for c in cells)
    assert {(c.staleness, c.seed) for c in cells} == {(s, k) for s in (1, 2, 4) for k in range(3)}


def test_final_score_is_the_mean_of_the_last_three_evaluations_and_drops():
    curve = [(0, 10.0), (5, 40.0), (9, 55.0), (14, 50.0), (20, 58.0)]
    f = curve_figures(curve)
    assert f["final_score"] == pytest.approx((55 + 50 + 58) / 3)
    assert f["max_drop"] == 5.0
    assert curve_figures([(0, 10.0), (5, 12.0)]) == {"final_score": 12.0, "max_drop": 0.0}
    assert curve_figures([(0, 10.0)]) == {"final_score": 10.0, "max_drop": 0.0}


def _confirm(diffs: dict[str, dict[int, list[float]]]) -> list[dict]:
    """Cells whose finals are the reference's [60, 61, 62] plus each rule's offsets."""
    ref = [60.0, 61.0, 62.0]
    cells = [_cell(REFERENCE, st, i, v) for st in (1, 2, 4) for i, v in enumerate(ref)]
    for rule, by_st in diffs.items():
        for st, offs in by_st.items():
            cells += [
                _cell(rule, st, i, v + o) for i, (v, o) in enumerate(zip(ref, offs, strict=True))
            ]
    return cells


def test_decision_rule_as_written():
    # upper: clearly above at staleness 4, within 1 point elsewhere → replaces the reference
    # fence: above at staleness 4 but 2 points below at staleness 1 → not eligible
    cells = _confirm(
        {
            "upper": {1: [0.5, -0.5, 0.0], 2: [-0.5, 0.0, -0.4], 4: [5.0, 5.2, 4.8]},
            "fence": {1: [-2.0, -2.1, -1.9], 2: [0.0, 0.0, 0.0], 4: [9.0, 9.1, 8.9]},
        }
    )
    d = decide(cells)
    assert d["default"] == "upper" and set(d["eligible"]) == {"upper"}
    up = d["comparisons"]["upper"]["by_staleness"]
    assert up["4"]["mean_diff"] == pytest.approx(5.0) and up["4"]["ci95"][0] > 0
    assert d["comparisons"]["fence"]["never_below_1"] is False
    # nothing whose interval clears zero → the reference stays the default
    flat = _confirm({"upper": {st: [1.0, -1.0, 0.5] for st in (1, 2, 4)}})
    assert decide(flat)["default"] == REFERENCE and decide(flat)["eligible"] == {}
    rows = summary(cells)
    assert [(r["rule"], r["staleness"]) for r in rows][:3] == [
        ("fence", 1),
        ("upper", 1),
        (REFERENCE, 1),
    ]
    assert all(r["seeds"] == 3 for r in rows)


def test_confirm_refuses_without_a_finished_screen(tmp_path):
    res = CliRunner().invoke(bench_app, ["filter", "--stage", "confirm", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "run `npd bench filter --stage screen` first" in str(res.exception)
