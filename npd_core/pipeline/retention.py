"""Which round checkpoints stay on disk: ``train.keep_checkpoints`` and the optimizer state.

A round's checkpoint is its weights (what ``npd export``, evaluation and the next rounds read)
plus ``trainer_state.pt`` (fp32 optimizer moments, about twice the weights: only what resuming
the next round's training needs). :func:`prune` runs after θ_k's evaluation is stored, the
first moment at which both of these hold:

- θ_k's train stage has completed and its result is persisted (evaluate(k) is downstream of
  it, and train(k) of train(k−1)), so no retry ever trains from θ_{j<k} again: the trainer
  states of rounds j < k go (θ_k's stays: train(k+1) resumes from it);
- θ_k's score is durable in ``evals``, so "best" (the checkpoints view's ``is_best``: the
  highest score on ``eval.primary``, ties to the later round) is known for every round ≤ k.

Weights of round j go (with ``keep_checkpoints: N``) when j is evaluated, not the best, not
among the last N rounds (j ≤ k − N) and generates no round still to come (staleness: D_q is
generated and scored by θ_{q−1−s}). θ_0 is the user's student and never touched. A checkpoint
is first renamed to a hidden trash name (one rename: a kill -9 leaves it whole or invisible),
then deleted; the run's sweep removes trash that a killed process left.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from npd_core.atomic import fsync_path, trash_name
from npd_core.crashpoints import pause_point
from npd_core.models import TRAINER_STATE
from npd_core.pipeline.spec import RunSpec, generator_round

ROUNDS_SQL = """
SELECT round, score IS NOT NULL AS evaluated, is_best FROM checkpoints
WHERE run_id = ? AND round > 0
"""


def pruned_rounds(
    evaluated: set[int],
    best: int | None,
    k: int,
    keep: int | None,
    staleness: int,
    rounds: int,
) -> set[int]:
    """Rounds whose weights go after θ_k's evaluation (see the module's docstring): evaluated,
    not ``best``, at most ``k − keep`` and no generator of a round after k. ``keep`` None:
    none."""
    if keep is None:
        return set()
    generators = {generator_round(q, staleness) for q in range(k + 1, rounds + 1)}
    return {j for j in evaluated if 1 <= j <= k - keep and j != best and j not in generators}


def prune(spec: RunSpec, k: int) -> list[int]:
    """After θ_k's evaluation is stored: delete the trainer states of rounds before k and the
    weights of the rounds ``pruned_rounds`` names; returns those rounds. Idempotent, so a
    retried evaluation runs it again safely."""
    cfg = spec.cfg
    for j in range(1, k):
        (Path(spec.checkpoint(j)) / TRAINER_STATE).unlink(missing_ok=True)
    rows = spec.store.query(ROUNDS_SQL, [spec.run_id]).to_pylist()
    evaluated = {x["round"] for x in rows if x["evaluated"]}
    best = next((x["round"] for x in rows if x["is_best"]), None)
    doomed = pruned_rounds(
        evaluated, best, k, cfg.train.keep_checkpoints, cfg.staleness, cfg.rounds
    )
    gone = sorted(j for j in doomed if Path(spec.checkpoint(j)).is_dir())
    trash = []
    for j in gone:
        path = Path(spec.checkpoint(j))
        trash.append(trash_name(path))
        os.rename(path, trash[-1])
    if trash:
        fsync_path(trash[0].parent)  # the renames outlive a power cut before the deletion
    pause_point(f"prune:{k}")
    for t in trash:
        shutil.rmtree(t, ignore_errors=True)
    return gone
