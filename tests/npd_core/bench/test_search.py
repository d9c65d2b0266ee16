"""The bench's grid search against made-up scores (no model runs)."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest

from npd_core.bench.harness import Hyper
from npd_core.bench.search import (
    GRID,
    QUICK_GRID,
    recorded_choice,
    search,
    search_report,
    separated,
    tuning,
)


def _fake_search(score_of) -> tuple[Hyper, list[dict]]:
    """The search against a method whose score is ``score_of(lr, rows)`` (no model runs)."""

    def score(method, h, k):
        return score_of(h.lr, h.rows_per_step)

    chosen, scores = search(["npd"], score, HYPER_BASE, GRID, lambda m: None)
    return chosen["npd"], scores["npd"]


HYPER_BASE = Hyper(lr=1e-3, rows_per_step=16, prompts_per_step=64)


def test_search_extends_an_edge_until_the_choice_is_interior():
    # the best lr is 4e-3: past the grid's top (2 × 1e-3), reached by one extension to 4e-3,
    # then a second (8e-3) shows it is interior; batch prefers the larger (16 rows, the edge):
    # one extension to 32 rows is worse, so 16 stays
    h, rows = _fake_search(lambda lr, r: -abs(math.log2(lr / 4e-3)) - abs(r - 16) / 16)
    assert (h.lr, h.rows_per_step, h.prompts_per_step) == (pytest.approx(4e-3), 16, 64)
    ext = [(x["lr"], x["rows_per_step"]) for x in rows if x["extension"]]
    assert [(pytest.approx(a), b) for a, b in ext] == [(4e-3, 16), (8e-3, 16), (4e-3, 32)]
    assert len(rows) == 6 + 3


def test_search_extends_each_axis_at_most_twice_and_keeps_ties_on_the_earlier_point():
    h, rows = _fake_search(lambda lr, r: lr * 1e3)  # ever larger lr is better
    ext = [(x["lr"], x["rows_per_step"]) for x in rows if x["extension"]]
    # lr: two extensions, then it stops; batch (at its top edge, 16 rows) once, a tie
    assert [(pytest.approx(a), b) for a, b in ext] == [(4e-3, 16), (8e-3, 16), (8e-3, 32)]
    assert h.lr == pytest.approx(8e-3) and h.rows_per_step == 16  # the tie keeps the earlier
    flat, rows = _fake_search(lambda lr, r: 1.0)  # all tied: the base point stays
    assert flat == HYPER_BASE
    assert [x["rows_per_step"] for x in rows if x["extension"]] == [32]  # batch was at its edge


def test_search_report_lists_the_grid_and_the_choice():
    h, rows = _fake_search(lambda lr, r: 1.0)
    rep = search_report(
        GRID, HYPER_BASE, {"prompt_tokens": 9.0}, 100.0, {"npd": h}, {"npd": rows}, 1000,
        {"npd": "search"},
    )  # fmt: skip
    assert rep["multipliers"] == {"lr": [1.0, 0.5, 2.0], "batch": [1.0, 0.5]}
    assert len(rep["points"]) == 6 and rep["points"][0] == rep["base"] == asdict(HYPER_BASE)
    assert rep["points"][4] == {"lr": 5e-4, "rows_per_step": 8, "prompts_per_step": 32}
    assert rep["search_budget_s"] == 50.0 and rep["extend"] == {"factor": 2.0, "max_per_axis": 2}
    assert rep["chosen"] == {"npd": asdict(h)} and rep["scores"]["npd"] == rows
    assert rep["separated"] == {"npd": False} and rep["tuned"] == {"npd": "search"}  # all tied
    one = search_report(QUICK_GRID, HYPER_BASE, {}, 100.0, {}, {}, 1000, {})
    assert one["search_budget_s"] is None  # one point: no search runs


def test_separated_needs_a_lead_above_one_standard_error():
    # 1000 prompts at 50 and 47: SE of the difference = 100·√(2·0.25/1000) ≈ 2.24 points
    rows = [{"score": 47.0}, {"score": 50.0}, {"score": 30.0}]
    assert separated(rows, 1000) is True
    assert separated(rows, 100) is False  # SE ≈ 7.1 points on 100 prompts
    assert separated(rows[:1], 1000) is None  # one point: no search


def test_quick_takes_the_last_full_benchs_choice_unsearched(tmp_path):
    """docs/bench-WORLD.json's grid.chosen is what --quick runs at; a quick bench's file or
    none leaves the config's values, marked untuned."""
    import json

    chosen = {"npd": asdict(Hyper(0.012, 4, 60)), "onpolicy": asdict(Hyper(0.006, 8, 121))}
    (tmp_path / "bench-toy.json").write_text(
        json.dumps({"quick": False, "grid": {"chosen": chosen}})
    )
    (tmp_path / "bench-long.json").write_text(
        json.dumps({"quick": True, "grid": {"chosen": chosen}})
    )
    rec = recorded_choice("toy", tmp_path)
    assert rec == (
        {"npd": Hyper(0.012, 4, 60), "onpolicy": Hyper(0.006, 8, 121)},
        "docs/bench-toy.json",
    )
    assert recorded_choice("long", tmp_path) is None and recorded_choice("views", tmp_path) is None
    scored = []
    got, rows = search(
        ["npd", "sft", "onpolicy"], lambda m, h, k: scored.append(m) or 1.0, HYPER_BASE,
        QUICK_GRID, lambda m: None, rec[0],
    )  # fmt: skip
    assert got == {"npd": rec[0]["npd"], "sft": HYPER_BASE, "onpolicy": rec[0]["onpolicy"]}
    assert scored == [] and rows == {"npd": [], "sft": [], "onpolicy": []}
    assert tuning(["npd", "sft"], QUICK_GRID, rec) == {
        "npd": "docs/bench-toy.json",
        "sft": "untuned",
    }
    assert tuning(["npd"], QUICK_GRID, None) == {"npd": "untuned"}
    assert tuning(["npd"], GRID, rec) == {"npd": "search"}
