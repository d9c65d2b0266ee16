"""The ``sft`` baseline: sequence-level KD (Kim & Rush 2016). The teacher answers every training
prompt once (greedy: its best single answer), the answers go to the store as a generate stage
whose generator is the teacher (same table, same provenance columns as the student's samples),
and the student trains on them with NPD's packer and optimizer step, hard-label cross-entropy
on the teacher's tokens. The teacher's generation is on the clock: it is this method's cost.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from npd_core.baselines.budget import batch_indices, resume, save
from npd_core.errors import TrainingError
from npd_core.method.attention import for_training
from npd_core.method.packing import Sample, packed_rows
from npd_core.method.train import micro_batches, optimizer_step
from npd_core.models import use_bf16
from npd_core.pipeline.spec import RunSpec, StageResult
from npd_core.seeds import seed_for

DATA_ROUND = 0  # the teacher's answers are stored as round 0 of the sft run (before training)


def sft_config(config: dict) -> dict:
    """The sft run's config: every training prompt, the teacher's greedy answer, one stage at a
    time (staleness 0: all cores)."""
    cfg = dict(config)
    cfg["data"] = {**cfg.get("data", {}), "prompts_per_round": 10_000_000}
    cfg["generate"] = {**cfg.get("generate", {}), "temperature": 0.0}
    cfg["staleness"] = 0
    return cfg


def teacher_as_generator(spec: RunSpec) -> RunSpec:
    """The same run with the teacher in θ_0's place, for the generate stage at ``DATA_ROUND``:
    its rows then name the teacher as ``generator_checkpoint``."""
    return dataclasses.replace(spec, student=spec.teacher)


def teacher_samples(spec: RunSpec) -> list[Sample]:
    """The teacher's non-empty answers from the store."""
    s = spec.store.read_stage(spec.run_id, DATA_ROUND, "generate", "samples")
    pairs = zip(
        s.column("prompt_token_ids").to_pylist(),
        s.column("response_token_ids").to_pylist(),
        strict=True,
    )
    return [Sample(p, y) for p, y in pairs if y]


def sft_segment(
    spec: RunSpec,
    k: int,
    until_s: float,
    budget_s: float,
    clock0_s: float = 0.0,
) -> StageResult:
    """θ_{k−1} → θ_k: packed CE steps on the teacher's answers until the clock reaches
    ``until_s``; the first segment's clock starts at ``clock0_s`` (the teacher's generation)."""
    cfg = spec.cfg
    tc = cfg.train.step_spec()
    torch.set_num_threads(cfg.stage_threads(concurrent=False))
    t_start, p_start = time.time(), time.perf_counter()
    p = cfg.pack
    seed = seed_for(cfg.seed, "pack", DATA_ROUND)
    samples, _, rows = packed_rows(teacher_samples(spec), p.max_seq_len, p.overlong, p.mode, seed)
    if not rows:
        raise TrainingError(
            f"sft run {spec.run_id}: the teacher gave no usable answer to train on; "
            "check data.prompts and generate.max_new_tokens"
        )
    lrn = resume(spec, k, clock0_s)
    lrn.start()
    with for_training(lrn.model, spec.kernel("train")):  # the run's recorded choice
        lrn.model.train()
        while lrn.elapsed() < until_s:
            t0 = time.perf_counter()
            lr = lrn.lr(tc)
            idx = batch_indices(len(rows), tc.rows_per_step, lrn.step, cfg.seed)
            micro = micro_batches(
                samples,
                [rows[i] for i in idx],
                lrn.tok.pad_token_id,
                tc.forwards(len(idx)),
                row_len=cfg.pack.max_seq_len,
            )
            loss = optimizer_step(  # targets=None: CE on the labels, i.e. the teacher's tokens
                lrn.model,
                lrn.optimizer,
                micro,
                None,
                tc,
                lr=lr,
                step=lrn.step,
                bf16=use_bf16(cfg.models.bf16),
            )
            dt = time.perf_counter() - t0
            tokens = sum(b.n_real_tokens for b in micro)
            lrn.add(train_s=dt, train_tokens=tokens)
            lrn.stepped(loss.item(), lr, tokens, dt, budget_s, tc.warmup_steps)
    return save(spec, k, lrn, time.perf_counter() - p_start, t_start)
