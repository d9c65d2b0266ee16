"""The round DAG of a run, once, for every orchestrator (the flow's own tasks, the work pools).

Steps: ``produce`` q (generate → score → filter → pack of D_q) needs D_{q−1} packed (one
producer at a time) and θ_{g(q)} trained; ``train`` r needs D_r packed, θ_{r−1} trained and, but
with ``eval.when: end``, θ_{r−1} evaluated; ``evaluate`` r needs θ_r (with ``eval.when: end``,
also θ_R and θ_{r−1}'s evaluation: one by one after the last round). ``round_plan`` lists the
steps in an order where each comes after every step it needs, so an orchestrator can start
them in turn: with ``staleness ≥ 1`` the producer of D_{r+1} is listed before round r's
evaluation, so it overlaps training.
"""

from __future__ import annotations

from typing import Literal

from npd_core.pipeline.spec import generator_round

Step = tuple[Literal["produce", "train", "evaluate"], int]


def round_plan(
    rounds: int, staleness: int, at_end: bool = False, strict: bool = False
) -> list[Step]:
    """Every step of ``rounds`` rounds in a valid start order. ``at_end``: every evaluation
    (θ_0 first) after the last round; ``strict``: each producer after the evaluation before it
    (the order of a run without overlap; both orders give the same tables)."""
    plan: list[Step] = [] if at_end else [("evaluate", 0)]
    produced = 0

    def produce(trained: int) -> None:
        """Every producer whose generator θ_{g(q)} is trained (or training) by now."""
        nonlocal produced
        while produced < rounds and generator_round(produced + 1, staleness) <= trained:
            produced += 1
            plan.append(("produce", produced))

    produce(0)
    for r in range(1, rounds + 1):
        plan.append(("train", r))
        if not strict:
            produce(r)
        if not at_end:
            plan.append(("evaluate", r))
        if strict:
            produce(r)
    if at_end:
        plan += [("evaluate", r) for r in range(rounds + 1)]
    return plan
