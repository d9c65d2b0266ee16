"""The filter study's stages on disk: the confirm stage's cells come from a complete screen (else
one error line), a saved stage reads back, the plot averages each rule's seeds at staleness 4."""

from __future__ import annotations

import pytest

from npd_core.bench import filter_stages as fst
from npd_core.bench.filter_study import CONFIRM_SEEDS, REFERENCE, screen_cells
from npd_core.errors import ConfigError


def test_confirm_cells_come_from_the_saved_screen_and_a_partial_one_is_refused(tmp_path):
    cells = screen_cells()
    scored = [
        {"name": c.name, "rule": c.rule, "final_score": float(i)} for i, c in enumerate(cells)
    ]
    fst.save(tmp_path / "screen.json", {"cells": scored[:-1]})
    with pytest.raises(ConfigError, match=f"has {len(cells) - 1} of {len(cells)} cells"):
        fst.stage_cells("confirm", tmp_path)
    fst.save(tmp_path / "screen.json", {"cells": scored, "nan": float("nan")})
    assert fst.load(tmp_path / "screen.json")["nan"] is None  # strict JSON on disk
    confirm = fst.stage_cells("confirm", tmp_path)
    rules = list(dict.fromkeys(c.rule for c in confirm))
    assert len(rules) == 3 and rules[-1] == REFERENCE
    assert {c.seed for c in confirm} == set(range(CONFIRM_SEEDS))
    assert fst.stage_cells("screen", tmp_path / "nothing") == cells
    assert fst.load(tmp_path / "nothing" / "x.json") == {}


def test_plotted_means_average_the_seeds_at_staleness_4_only():
    def cell(rule: str, staleness: int, scores: list[float]) -> dict:
        rounds = [{"round": i, "score": s} for i, s in enumerate(scores)]
        return {"rule": rule, "staleness": staleness, "rounds": rounds}

    done = [cell("a", 4, [0.0, 2.0]), cell("a", 4, [2.0, 4.0]), cell("a", 1, [9.0, 9.0])]
    means = fst.plotted_means([*done, cell("b", 1, [1.0, 1.0])])
    assert list(means) == ["a", "b"]
    assert means["a"] == [(0, 1.0), (1, 3.0)] and means["b"] == []
