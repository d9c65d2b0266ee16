"""Training on a wall-clock budget, one segment per held-out checkpoint (the baselines' frame).

A baseline (``sft``, ``onpolicy``) trains θ_{k−1} → θ_k until its training clock reaches the
k-th checkpoint time, saves θ_k with its optimizer, step and clock (the NPD checkpoint format),
and the flow evaluates θ_k outside the clock; segment k+1 resumes from θ_k. So the clock pauses
while evaluating, every checkpoint is a plain HF directory that the shared evaluate stage scores,
and a failed segment can be retried from the last one.

Learning-rate schedule: the same as NPD's (``optim.lr_at``: linear warmup, cosine to
``min_lr_ratio × lr``), over a horizon of steps that a time budget does not give up front. The
horizon is set after the warmup (at least ``CALIBRATION_STEPS`` steps) as the number of steps
that fit the budget at the mean speed so far, and set again whenever that prediction drifts more
than ``HORIZON_DRIFT`` from it (steps get slower or faster as responses change length), so the
cosine ends with the budget; warmup itself does not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field

from npd_core.method.optim import lr_at
from npd_core.method.train import StepLog
from npd_core.pipeline import learner
from npd_core.pipeline.spec import RunSpec, StageResult
from npd_core.seeds import seed_for
from npd_core.train_spec import StepSpec

CALIBRATION_STEPS = 5
HORIZON_DRIFT = 0.10  # re-fit the lr horizon when the predicted steps move this much
NO_HORIZON = 10**9  # before the horizon is known: past the warmup the lr stays at its peak


@dataclass
class Learner(learner.Learner):
    """The student between checkpoints (``pipeline.learner``) with the clock and the counters
    a segment carries."""

    clock_s: float = 0.0  # training clock at the start of this segment (evaluation excluded)
    train_start_s: float | None = None  # clock after the first step
    total_steps: int | None = None  # lr horizon, fixed after calibration
    counters: dict[str, float] = field(default_factory=dict)  # tokens and seconds per stage
    log: list[StepLog] = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        """Start (or restart) the clock: call right before the first step of a segment."""
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        """The training clock now."""
        return self.clock_s + time.perf_counter() - self._t0

    def lr(self, spec: StepSpec) -> float:
        return lr_at(self.step, spec, self.total_steps or NO_HORIZON)

    def add(self, **amounts: float) -> None:
        for k, v in amounts.items():
            self.counters[k] = self.counters.get(k, 0.0) + v

    def stepped(
        self, loss: float, lr: float, tokens: int, seconds: float, budget_s: float, warmup: int
    ) -> None:
        """Count one optimizer step; set the lr horizon once the calibration steps are done and
        re-fit it when the steps that fit the budget drift more than ``HORIZON_DRIFT``."""
        now = self.elapsed()
        if self.train_start_s is None:  # the first step's one-time costs stay out of the rate
            self.train_start_s = now
        self.log.append(StepLog(self.step, loss, lr, tokens, tokens / max(seconds, 1e-9)))
        self.step += 1
        if self.step < max(warmup, CALIBRATION_STEPS):
            return
        per_step = (now - self.train_start_s) / (self.step - 1)
        predicted = self.step + max(0, round((budget_s - now) / per_step))
        if self.total_steps is None:
            self.total_steps = predicted
        elif abs(predicted - self.total_steps) > HORIZON_DRIFT * self.total_steps:
            self.total_steps = predicted
            self.add(horizon_refits=1)


def resume(spec: RunSpec, k: int, clock0_s: float = 0.0) -> Learner:
    """θ_{k−1} with its optimizer and counters; θ_0 is the warm-start student at ``clock0_s``."""
    lrn, state = learner.open_learner(spec.checkpoint(k - 1), spec.cfg, resume=k > 1)
    if state is None:
        return Learner(lrn.model, lrn.tok, lrn.optimizer, clock_s=clock0_s)
    return Learner(
        lrn.model,
        lrn.tok,
        lrn.optimizer,
        step=lrn.step,
        clock_s=state["clock_s"],
        train_start_s=state["train_start_s"],
        total_steps=state["total_steps"],
        counters=state["counters"],
    )


def save(spec: RunSpec, k: int, lrn: Learner, seconds: float, started: float) -> StageResult:
    """Write θ_k (weights, optimizer, counters, clock) and its ``checkpoints`` row."""
    clock = lrn.elapsed()
    learner.save_learner(
        lrn,
        spec.checkpoint(k),
        k,
        spec.config,
        clock_s=clock,
        train_start_s=lrn.train_start_s,
        total_steps=lrn.total_steps,
        counters=lrn.counters,
    )
    learner.record_checkpoint(spec, k, lrn.step, int(lrn.counters.get("train_tokens", 0)))
    losses = [x.loss for x in lrn.log]
    blob = json.dumps([k, lrn.step, losses]).encode()
    return StageResult(
        "train",
        k,
        hashlib.sha256(blob).hexdigest()[:16],
        seconds,
        started,
        time.time(),
        {
            "steps": len(lrn.log),
            "step": lrn.step,
            "clock_s": clock,
            "total_steps": lrn.total_steps,
            "mean_loss": sum(losses) / len(losses) if losses else None,
            "counters": dict(lrn.counters),
            "log": [vars(x) for x in lrn.log],
        },
    )


def batch_indices(n: int, size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s mini-batch: consecutive slices of seeded per-epoch shuffles of
    ``range(n)`` (a function of the step alone, so a resumed segment continues the stream)."""
    out: list[int] = []
    pos = step * size
    while len(out) < size:
        epoch, off = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed_for(seed, "batches", epoch)).shuffle(perm)
        take = perm[off : off + size - len(out)]
        out += take
        pos += len(take)
    return out
