"""The round DAG's start order: every step after the steps it needs, producers ahead of the
learner by the staleness, evaluations at the end when asked."""

from __future__ import annotations

import pytest

from npd_core.pipeline.plan import round_plan
from npd_core.pipeline.spec import generator_round


def _needs(step: str, r: int, rounds: int, staleness: int, at_end: bool) -> set[tuple[str, int]]:
    if step == "produce":
        return {("produce", r - 1), ("train", generator_round(r, staleness))}
    if step == "train":
        return {("produce", r), ("train", r - 1)} | (set() if at_end else {("evaluate", r - 1)})
    return {("train", r)} | ({("train", rounds), ("evaluate", r - 1)} if at_end else set())


@pytest.mark.parametrize("staleness", [0, 1, 2])
@pytest.mark.parametrize(("at_end", "strict"), [(False, False), (False, True), (True, False)])
def test_every_step_starts_after_what_it_needs(staleness, at_end, strict):
    plan = round_plan(4, staleness, at_end, strict)
    assert sorted(plan) == sorted(
        [(s, r) for s in ("produce", "train") for r in range(1, 5)]
        + [("evaluate", r) for r in range(5)]
    )
    for i, (step, r) in enumerate(plan):
        real = _needs(step, r, 4, staleness, at_end)  # θ_0 is never trained nor D_0 produced
        needs = {(s, k) for s, k in real if k > 0 or (s, k) == ("evaluate", 0)}
        assert needs <= set(plan[:i]), (step, r)


def test_staleness_one_produces_the_next_round_before_this_rounds_evaluation():
    assert round_plan(3, 1) == [
        ("evaluate", 0),
        ("produce", 1),
        ("produce", 2),
        ("train", 1),
        ("produce", 3),
        ("evaluate", 1),
        ("train", 2),
        ("evaluate", 2),
        ("train", 3),
        ("evaluate", 3),
    ]
    assert round_plan(2, 0, strict=True) == [
        ("evaluate", 0),
        ("produce", 1),
        ("train", 1),
        ("evaluate", 1),
        ("produce", 2),
        ("train", 2),
        ("evaluate", 2),
    ]
