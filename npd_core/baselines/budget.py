"""Training on a wall-clock budget, one segment per held-out checkpoint (the baselines' frame).

A baseline (``sft``, ``onpolicy``) trains θ_{k−1} → θ_k until its training clock reaches the
k-th checkpoint time, saves θ_k with its optimizer, step and clock (the NPD checkpoint format),
and the flow evaluates θ_k outside the clock; segment k+1 resumes from θ_k. So the clock pauses
while evaluating, every checkpoint is a plain HF directory that the shared evaluate stage scores,
and a failed segment can be retried from the last one.

Learning-rate schedule: the same as NPD's (``train.lr_at``: linear warmup, cosine to
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from npd_core.config import TrainConfig
from npd_core.method.train import (
    StepLog,
    checkpoint_activations,
    learner_dtype,
    lr_at,
    make_optimizer,
)
from npd_core.models import (
    load_model,
    load_tokenizer,
    load_trainer_state,
    rng_state,
    save_checkpoint,
)
from npd_core.pipeline.spec import RunSpec, StageResult, rel_path
from npd_core.seeds import seed_for
from npd_core.store import table_from_rows

CALIBRATION_STEPS = 5
HORIZON_DRIFT = 0.10  # re-fit the lr horizon when the predicted steps move this much
NO_HORIZON = 10**9  # before the horizon is known: past the warmup the lr stays at its peak


@dataclass
class Learner:
    """The student between checkpoints: weights, optimizer and the counters a segment carries."""

    model: PreTrainedModel
    tok: Any
    optimizer: Any
    step: int = 0
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

    def lr(self, cfg: TrainConfig) -> float:
        return lr_at(self.step, cfg, self.total_steps or NO_HORIZON)

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
    src = spec.checkpoint(k - 1)
    weights = learner_dtype(spec.cfg.train.weights_dtype)
    model = checkpoint_activations(load_model(src, weights), spec.cfg.train.gradient_checkpointing)
    opt = make_optimizer(model, spec.cfg.train)
    state = load_trainer_state(Path(src)) if k > 1 else None
    if state is None:
        return Learner(model, load_tokenizer(src), opt, clock_s=clock0_s)
    opt.load_state_dict(state["optimizer"])
    return Learner(
        model,
        load_tokenizer(src),
        opt,
        step=state["step"],
        clock_s=state["clock_s"],
        train_start_s=state["train_start_s"],
        total_steps=state["total_steps"],
        counters=state["counters"],
    )


def save(spec: RunSpec, k: int, lrn: Learner, seconds: float, started: float) -> StageResult:
    """Write θ_k (weights, optimizer, counters, clock) and its ``checkpoints`` row."""
    clock = lrn.elapsed()
    dst = Path(spec.checkpoint(k))
    state = dict(
        optimizer=lrn.optimizer.state_dict(),
        step=lrn.step,
        round=k,
        clock_s=clock,
        train_start_s=lrn.train_start_s,
        total_steps=lrn.total_steps,
        counters=lrn.counters,
        rng=rng_state(),
        config=spec.config,
    )
    save_checkpoint(lrn.model, lrn.tok, dst, state)
    row = dict(
        run_id=spec.run_id,
        round=k,
        path=rel_path(spec.root, str(dst)),
        step=lrn.step,
        train_tokens=int(lrn.counters.get("train_tokens", 0)),
        created_at=datetime.now(UTC),
    )
    spec.store.write_stage(
        spec.run_id, k, "train", {"checkpoints": table_from_rows("checkpoints", [row])}
    )
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
