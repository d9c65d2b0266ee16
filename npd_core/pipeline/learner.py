"""The learner's lifecycle, one for every method: open θ with its optimizer from a checkpoint,
train (NPD's round here; the baselines' budgeted segments in ``baselines.budget``), save θ with
its optimizer, step and RNG state, and record it in the store's ``checkpoints``.

A checkpoint is a plain HF directory plus ``trainer_state.pt`` (``models.save_checkpoint``):
``optimizer`` (the 1-process layout, whatever number of ranks wrote it), ``step``, ``round``,
``rng`` and ``config``, and whatever counters a method adds (the baselines' clock).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from npd_core import iotime
from npd_core.config import NPDConfig
from npd_core.method.attention import for_training
from npd_core.method.data_parallel import DataParallel
from npd_core.method.filter import step_weights
from npd_core.method.optim import checkpoint_activations, learner_dtype, lr_horizon, make_optimizer
from npd_core.method.packing import Sample
from npd_core.method.train import RoundStats, StepLog, StepWeights, Targets, train_round
from npd_core.models import (
    load_model,
    load_tokenizer,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    use_bf16,
)
from npd_core.pipeline import workers
from npd_core.pipeline.spec import RunSpec, rel_path
from npd_core.seeds import seed_for
from npd_core.store import table_from_rows

LEARNER_RANKS = "npd_core.pipeline.learner_ranks"  # what train.nproc > 1 ranks run


@dataclass
class Learner:
    """The student in training: weights, tokenizer, optimizer and the step θ is at; on a
    torchrun rank also the data-parallel group's view of them (``shard``)."""

    model: PreTrainedModel
    tok: Any
    optimizer: torch.optim.Optimizer
    step: int = 0
    shard: DataParallel | None = None


@dataclass
class RoundRows:
    """D_r as the learner takes it: the packed samples, the rows (lists of sample indices),
    the teacher's targets (None when nothing was packed) and each sample's key in its round
    (prompt_id, sample_idx)."""

    samples: list[Sample]
    rows: list[list[int]]
    targets: Targets | None
    keys: list[tuple[str, int]]


def open_learner(
    src: str, cfg: NPDConfig, *, resume: bool, parallel: bool = False
) -> tuple[Learner, dict[str, Any] | None]:
    """θ from ``src`` with its tokenizer and a fresh optimizer (``train.weights_dtype``,
    ``train.gradient_checkpointing``), and, when ``resume``, the optimizer state and step from
    ``src``'s trainer state, which is returned too for a method's own counters (None: a fresh
    start). ``parallel``: as this rank's part of a data-parallel learner (``train.strategy``)."""
    tc = cfg.train
    model = load_model(src, learner_dtype(tc.weights_dtype))
    model = checkpoint_activations(model, tc.gradient_checkpointing)
    shard = None
    if parallel:
        shard = DataParallel.wrap(model, tc.step_spec(), tc.strategy, use_bf16(cfg.models.bf16))
    opt = shard.optimizer if shard else make_optimizer(model, tc.step_spec())
    lrn = Learner(model, load_tokenizer(src), opt, shard=shard)
    state = load_trainer_state(Path(src)) if resume else None
    if state is None:
        return lrn, None
    if shard:
        shard.load_optimizer_state(state["optimizer"])
    else:
        opt.load_state_dict(state["optimizer"])
    lrn.step = state["step"]
    return lrn, state


def save_learner(lrn: Learner, dst: str, r: int, config: dict[str, Any], **counters: Any) -> None:
    """Write θ to ``dst`` with its optimizer state, step, round ``r``, RNG state, ``config``
    and a method's ``counters``. On data-parallel ranks a collective: rank 0 writes the full
    weights and optimizer state, gathered from every rank."""
    shard = lrn.shard
    optimizer = shard.optimizer_state() if shard else lrn.optimizer.state_dict()
    student = shard.full_student() if shard else lrn.model
    if student is None:  # not rank 0
        return
    state = dict(optimizer=optimizer, step=lrn.step, round=r, rng=rng_state(), config=config)
    save_checkpoint(student, lrn.tok, Path(dst), {**state, **counters})


def record_checkpoint(
    spec: RunSpec, r: int, step: int, train_tokens: int, weighed: Sequence[dict[str, Any]] = ()
) -> None:
    """θ_r's row in the store's ``checkpoints``, written as the train stage of round ``r``,
    with the step weights' rows (:func:`step_weight_rows`) when the round has any."""
    now = datetime.now(UTC)
    row = dict(
        run_id=spec.run_id,
        round=r,
        path=rel_path(spec.root, spec.checkpoint(r)),
        step=step,
        train_tokens=train_tokens,
        created_at=now,
    )
    tables = {"checkpoints": table_from_rows("checkpoints", [row])}
    if weighed:
        rows = [dict(x, run_id=spec.run_id, round=r, created_at=now) for x in weighed]
        tables["step_weights"] = table_from_rows("step_weights", rows)
    spec.store.write_stage(spec.run_id, r, "train", tables)


def step_weight_rows(data: RoundRows, weights: dict[int, StepWeights]) -> list[dict[str, Any]]:
    """The ``step_weights`` rows of a round (``filter.score: learner_ratio``): every sample of
    every step, by its key, with its learner ratio (null: a fixed source) and weight."""
    rows = []
    for step, w in weights.items():
        columns = w.index.tolist(), w.ratio.tolist(), w.weight.tolist()
        for i, ratio, weight in zip(*columns, strict=True):
            prompt_id, sample_idx = data.keys[i]
            ratio = None if math.isnan(ratio) else ratio
            rows.append(
                dict(
                    step=step,
                    prompt_id=prompt_id,
                    sample_idx=sample_idx,
                    ratio=ratio,
                    weight=weight,
                )
            )
    return rows


def learn_round(
    spec: RunSpec,
    r: int,
    data: RoundRows,
    on_step: Callable[[StepLog], None] | None = None,
    parallel: bool = False,
) -> tuple[RoundStats, int]:
    """θ_{r−1} → θ_r on D_r (``data``), written to ``spec.checkpoint(r)``: packed SFT on the
    stored teacher targets, ≤ steps_per_round steps, each weighing its samples by their
    learner ratios under a ``learner_ratio`` rule; the round's stats and θ_r's step.
    ``parallel``: this process is one torchrun rank of ``train.nproc`` (``learner_ranks``)."""
    cfg = spec.cfg
    lrn, _ = open_learner(spec.checkpoint(r - 1), cfg, resume=r > 1, parallel=parallel)
    step_spec = cfg.train.step_spec()
    weigh = partial(step_weights, cfg=cfg.filter) if cfg.filter.weighs_steps else None
    torch.manual_seed(seed_for(cfg.seed, "dropout", r))  # for models that have dropout
    with for_training(lrn.model, spec.kernel("train")):
        stats = train_round(
            lrn.model,
            lrn.optimizer,
            data.samples,
            data.targets,
            data.rows,
            step_spec,
            cfg.pack.max_seq_len,
            start_step=lrn.step,
            total_steps=lr_horizon(lrn.step, len(data.rows), cfg.rounds - r + 1, step_spec),
            seed=seed_for(cfg.seed, "train", r),
            pad_id=lrn.tok.pad_token_id,
            bf16=use_bf16(cfg.models.bf16),
            on_step=on_step,
            shard=lrn.shard,
            weigh=weigh,
        )
    lrn.step += stats.steps
    save_learner(lrn, spec.checkpoint(r), r, cfg.model_dump(mode="json"))
    return stats, lrn.step


def learn_on_ranks(
    spec: RunSpec, r: int, on_step: Callable[[StepLog], None] | None
) -> tuple[RoundStats, int, dict[str, Any]]:
    """``learn_round`` on the run's ``train.nproc`` torchrun ranks (started on the flow run's
    first round, kept for the next ones: ``pipeline.workers``), each on its share of the
    stage's threads; also how many ranks ran and how long starting them took (0 when kept)."""
    n = spec.cfg.train.nproc
    threads = max(1, spec.stage_threads() // n)
    group = workers.group(n, LEARNER_RANKS, threads)
    fresh = group.jobs == 0

    def progress(entry: dict[str, Any]) -> None:
        if on_step:
            on_step(StepLog(**entry))

    out = group.run({"spec": asdict(spec), "round": r, "threads": threads}, progress)
    iotime.extend(out["io_spans"])
    stats = RoundStats(**{**out["stats"], "log": [StepLog(**x) for x in out["stats"]["log"]]})
    return stats, out["step"], {"ranks": n, "ranks_start_s": group.start_s if fresh else 0.0}
