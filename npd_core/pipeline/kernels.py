"""Which packed-attention kernel each role of a run uses, chosen once at the run's start.

Roles: ``train`` (the learner: forward and backward on rows of ``pack.max_seq_len``),
``score_teacher`` and ``score_student`` (the hf backend's packed scoring forwards). A role's
knob (``train.attention``, ``score.attention``) pins its kernel; ``auto`` times the device's
exact kernels (``autotune.select``) on the stage's shape bucket, cached in
``<out>/kernels.json`` so later runs in the same directory reuse the measurement; scoring on
CPU takes the per-sequence kernel unmeasured, so that its scores do not depend on how a round is
sharded (``PER_SEQUENCE_SCORING``). The choice is
written into the run spec before any stage runs: every stage, retry and resume reads it from
there, so a run's results never depend on a timing taken after it began.

``NPD_ATTENTION`` stands in for ``auto`` where it is set: ``fixed`` (the kernels npd used before
the choice existed, ``attention.FIXED``) or a kernel name. The test suite sets ``fixed`` so that
no test result depends on a timing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from transformers import AutoConfig

from npd_core.config import NPDConfig
from npd_core.data import read_prompts
from npd_core.errors import ConfigError
from npd_core.method.attention import VARLEN, fixed_kernel
from npd_core.models import device, format_prompts, frozen_dtype, load_tokenizer, use_bf16
from npd_core.pipeline.autotune import KERNELS, Choice, Shape, kernels, select, unavailable
from npd_core.pipeline.spec import RunSpec

ENV = "NPD_ATTENTION"
# Scoring's kernel where one device has a per-sequence kernel: a sample's scores then depend on
# the sample alone. Under stock SDPA's block-diagonal mask they move in float32's last bits with
# the length of the packed row and the sample's place in it (CPU SDPA's blocking), which depend
# on the samples scored with it, so on ``orchestration.shards``: measured on the toy world, a
# round's teacher sums 1.5e-5 apart for K = 2 (one float32 step near -130), top-k log-probs
# 1.4e-5; per sequence, identical. Its cost there: 6% of a scoring forward (kernels.json).
PER_SEQUENCE_SCORING = {"cpu": VARLEN}
CACHE = "kernels.json"  # in the output directory
SAMPLE_PROMPTS = 256  # prompts tokenized to estimate the sequence lengths


def choose_attention(
    spec: RunSpec, log: Callable[[str], None] | None = None, roles: tuple[str, ...] | None = None
) -> RunSpec:
    """``spec`` with ``attention`` filled in: unchanged when it is already recorded (a retry or
    a resume reuses the choice, never re-measures), else each role's pinned or measured kernel
    (only ``roles`` where given: the sft baseline scores nothing); on CPU, scoring's is the
    per-sequence kernel (``PER_SEQUENCE_SCORING``) unless ``score.attention`` or ``ENV`` pins
    one. ``log`` defaults to the ``print`` of the moment, so inside a flow with ``log_prints``
    the lines go to Prefect's logger (stderr), never to the stdout of ``--json``."""
    if spec.attention is not None:
        return spec
    cfg = spec.cfg
    dev = device().type
    env = _env_setting()
    shapes: dict[str, Shape] = {}
    chosen: dict[str, str] = {}
    for role, knob, setting, model_dir in _roles(spec, cfg):
        if roles is not None and role not in roles:
            continue
        kind = "train" if role == "train" else "score"
        if setting != "auto":
            _runs_here(knob, setting)
            kernel, why = setting, f"pinned by {knob}"
        elif kind == "score" and dev in PER_SEQUENCE_SCORING and env in ("", "fixed"):
            kernel = PER_SEQUENCE_SCORING[dev]
            why = "per sequence: a sample's scores do not depend on orchestration.shards"
        elif env == "fixed":
            kernel, why = fixed_kernel(kind, dev), f"{ENV}=fixed"
        elif env:
            kernel, why = env, f"pinned by {ENV}"
        else:
            shapes = shapes or stage_shapes(spec, cfg, dev)
            c = select(
                AutoConfig.from_pretrained(model_dir), shapes[kind], cache=Path(spec.root) / CACHE
            )
            kernel, why = c.kernel, describe(c)
            left_out = unavailable(dev, shapes[kind].dtype)  # none on CPU
            if left_out:
                why += "; not candidates: " + "; ".join(f"{n}: {w}" for n, w in left_out.items())
        if kernel is not None:
            chosen[role] = kernel
        (log or print)(f"packed attention, {role}: {kernel or 'the model default'} ({why})")
    return replace(spec, attention=chosen)


def _roles(spec: RunSpec, cfg: NPDConfig) -> list[tuple[str, str, str, str]]:
    """(role, knob, setting, model dir) of every role this run has."""
    roles = [("train", "train.attention", cfg.train.attention, spec.student)]
    if (cfg.score.backend or cfg.generate.backend) != "vllm":
        roles.append(("score_teacher", "score.attention", cfg.score.attention, spec.teacher))
        if cfg.filter.needs_views:
            roles.append(("score_student", "score.attention", cfg.score.attention, spec.student))
    return roles


def _runs_here(knob: str, setting: str) -> None:
    """Refuse a pinned CUDA kernel that cannot run on this machine, saying why."""
    cuda_only = {k.name for k in KERNELS["cuda"]} - {k.name for k in KERNELS["cpu"]}
    why = unavailable("cuda").get(setting) if setting in cuda_only else None
    if why:
        raise ConfigError(f"{knob}: {setting} cannot run here ({why}); use auto or sdpa")


def _env_setting() -> str:
    value = os.environ.get(ENV, "").strip()
    names = {n for dev in ("cpu", "cuda") for n in kernels(dev)} | {"sdpa", "sdpa_varlen"}
    if value and value != "fixed" and value not in names:
        raise ConfigError(
            f"{ENV}={value!r}: use fixed or one of {', '.join(sorted(names))}, or unset it"
        )
    return value


def stage_shapes(spec: RunSpec, cfg: NPDConfig, dev: str) -> dict[str, Shape]:
    """The shape buckets of the train and score stages, estimated before any sample exists from
    up to ``SAMPLE_PROMPTS`` prompts: a sequence is a prompt plus its reference answer and EOS
    (half of ``generate.max_new_tokens`` where the prompts have no answers), median over the
    prompts; a scoring row is as long as the longest prompt plus ``max_new_tokens`` (scoring
    packs into rows of the round's longest sample, which often runs to the cap)."""
    tok = load_tokenizer(spec.student)
    prompts = read_prompts(spec.train_prompts)[:SAMPLE_PROMPTS]
    ids = format_prompts(tok, [p.prompt for p in prompts], cfg.data.chat_template)
    new = cfg.generate.max_new_tokens
    if prompts and all(p.answer is not None for p in prompts):
        resp = [
            min(new, len(tok(p.answer, add_special_tokens=False)["input_ids"]) + 1) for p in prompts
        ]
    else:
        resp = [max(1, new // 2)] * len(ids)
    seqs = sorted(len(x) + r for x, r in zip(ids, resp, strict=True)) or [1]
    seq = seqs[len(seqs) // 2]
    threads = spec.stage_threads()
    msl = cfg.pack.max_seq_len
    row = max((len(x) for x in ids), default=1) + new
    frozen = str(frozen_dtype(cfg.models.frozen_dtype)).removeprefix("torch.")
    return {
        "train": Shape.learner(
            rows=cfg.train.rows_per_step,
            row_len=msl,
            seq_len=seq,
            threads=threads,
            device=dev,
            bf16=use_bf16(cfg.models.bf16),
        ),
        "score": Shape.bucket(
            backward=False,
            rows=max(1, cfg.score.batch_tokens // row),
            row_len=row,
            seq_len=seq,
            threads=threads,
            device=dev,
            dtype=frozen,
        ),
    }


def describe(c: Choice) -> str:
    """Why a kernel was chosen, with the probe's times."""
    if c.source == "none":
        return "no exact kernels listed for this device"
    if c.source == "only":
        return "the only candidate"
    ms = ", ".join(f"{n} {1e3 * s:.2f} ms" for n, s in sorted(c.seconds.items()))
    return f"{c.source} on bucket {c.key}: {ms}"
