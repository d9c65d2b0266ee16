"""Packed vs padded SFT throughput on one long-tailed length mix, in one run.

    python -m npd_core.bench.packing [--json] [--device cuda --model-size 100m --n-samples 32768]

Needs only torch and transformers (plus this package's ``packing`` and ``train``), so it runs on a
bare GPU box. ``npd bench packing`` calls the same :func:`run_bench`.

What it does, in order:

1. builds one length mix: ``n_samples`` prompt+response lengths, log-normal (median ~60 tokens,
   p99 ~400, like chat SFT data) or read from a file; random token ids and random teacher top-k
   targets (training is the NPD learner's own step, ``npd_core.method.train.optimizer_step``,
   with the default config's loss, lr and clip: forward KL on the top-k, optional sft mix);
2. packs them with best-fit-decreasing into rows of ``max_seq_len`` = 2 × p99 sample length
   (rounded up to a multiple of 16), ``rows_per_step`` rows per optimizer step;
3. builds the padded baseline a user would run: Trainer/TRL ``group_by_length`` (shuffle, sort by
   length inside mega-batches of ``mega_batch_mult × batch_size``), each batch padded to its own
   longest sample, with as many samples per step as a packed step holds on average (so both
   take the same number of optimizer steps over the same samples);
4. picks, per layout, the fastest attention among the exact ones this device has (each candidate
   is timed on a throwaway copy and its loss checked against the padded reference);
5. trains two copies of the same initial student, one per layout, alternating steps so that
   background load hits both alike, and reports tokens/s on real response tokens;
6. reports the kernel the pipeline's own selection picks for these rows
   (``npd_core.method.attention.select``, what ``train.attention: auto`` records in a run's spec)
   and times the real learner, ``train_round`` as the train stage calls it (collation included),
   with each exact kernel of the device: ``selection`` and ``learner`` in the output (on CUDA
   the candidates are ``attention.KERNELS["cuda"]``; ``selection.unavailable`` names those that
   cannot run here and why, e.g. flash-attn not installed).
   ``--model DIR`` trains an HF checkpoint (e.g. the toy world's student) instead of a random one.

Timed: forward, loss, backward, clip, optimizer step (batches are collated beforehand, as a
DataLoader with workers would). CPU runs use one intra-op thread unless ``--threads`` says
otherwise (see :func:`run_bench`). MFU (CUDA, or with ``--peak-tflops``):
``(6 · N · real_tokens + 6 · n_layers · n_heads · head_dim · Σ L²) / seconds / peak`` where N
counts every parameter once (tied embeddings once) and the second term is causal attention on
each sequence's own length L (useful FLOPs only; masked or padded work is not counted).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from npd_core.errors import ConfigError
from npd_core.method.attention import (
    VARLEN,
    Shape,
    kernels,
    known,
    register_varlen_attention,
    select,
    unavailable,
)
from npd_core.method.packing import PackedBatch, Sample, collate, fit_lengths, pack
from npd_core.method.train import (
    StepSpec,
    Targets,
    make_optimizer,
    optimizer_step,
    step_loss,
    train_round,
)

# Qwen2-style students; head size 64 everywhere (what flash/vLLM kernels accept).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
    ),  # ~0.2 M
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),  # ~5 M
    "100m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
    ),  # ~100 M
}
# Dense bf16 peak FLOP/s by device-name substring (first match wins).
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
]


def attention_candidates(device: torch.device, bf16: bool = False) -> tuple[list[str], list[str]]:
    """Exact attention implementations to try: (packed, padded). CUDA: the pipeline's CUDA
    candidates that run here (``attention.KERNELS``; bf16 autocast lets the flash kernels in)
    and per-sequence SDPA; padded, SDPA and transformers' flash_attention_2 where flash-attn is
    importable. CPU: the pipeline's candidates (flex attention has no CPU backward), and eager."""
    if device.type == "cuda":
        fa = ["flash_attention_2"] if find_spec("flash_attn") else []
        dtype = "bfloat16" if bf16 else "float32"
        return [*kernels("cuda", dtype), VARLEN], fa + ["sdpa"]
    return [*kernels(device.type), "eager"], ["sdpa", "eager"]


# ---------------------------------------------------------------- data
def synthetic_lengths(
    n: int, median: float = 60.0, p99: float = 400.0, seed: int = 0
) -> list[tuple[int, int]]:
    """``n`` (prompt, response) lengths: total log-normal with the given median and p99,
    prompt share uniform in [0.15, 0.5]; both parts at least 1 token."""
    if not 2 <= median < p99:
        raise ConfigError(f"median {median} / p99 {p99}: need 2 <= median < p99")
    rng = random.Random(seed)
    sigma = math.log(p99 / median) / 2.3263  # z of the 99th percentile
    out = []
    for _ in range(n):
        total = max(2, round(math.exp(rng.gauss(math.log(median), sigma))))
        prompt = min(total - 1, max(1, round(total * rng.uniform(0.15, 0.5))))
        out.append((prompt, total - prompt))
    return out


def read_lengths(path: str | Path) -> list[tuple[int, int]]:
    """Lengths from a file: JSON list of [prompt, response] pairs, or one ``p r`` pair a line."""
    text = Path(path).read_text()
    try:
        pairs = json.loads(text)
    except json.JSONDecodeError:
        pairs = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    try:
        out = [(int(p), int(r)) for p, r in pairs]
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected [prompt, response] length pairs") from None
    if not out or min(min(p, r) for p, r in out) < 1:
        raise ConfigError(f"{path}: need at least one pair, every length >= 1")
    return out


def make_data(
    lengths: list[tuple[int, int]], vocab: int, k: int, seed: int
) -> tuple[list[Sample], Targets]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for p, r in lengths:
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        samples.append(Sample(ids[:p], ids[p:]))
    return samples, targets_for(samples, vocab, k, seed)


def targets_for(samples: list[Sample], vocab: int, k: int, seed: int) -> Targets:
    g = torch.Generator().manual_seed(seed + 1)
    offsets, m = [], 0
    for s in samples:
        offsets.append(m)
        m += len(s.response_ids)
    ids = torch.randint(0, vocab, (m, k), generator=g)  # (M, k)
    lp = torch.log_softmax(2 * torch.randn(m, k, generator=g), -1).sort(-1, descending=True).values
    return Targets(ids, lp, offsets)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int = 0
) -> list[list[int]]:
    """transformers' ``get_length_grouped_indices`` (TRL ``group_by_length``), cut into batches.

    Shuffle; sort by length (longest first) inside mega-batches of ``mega_batch_mult ×
    batch_size``; move the longest sample to the first batch. ``mega_batch_mult = 0`` uses the
    Trainer's rule ``min(n // (4 · batch_size), 50)``, at least 1.
    """
    n = len(lengths)
    mult = mega_batch_mult or max(1, min(n // (batch_size * 4), 50))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    size = mult * batch_size
    megas = [sorted(perm[i : i + size], key=lambda j: -lengths[j]) for i in range(0, n, size)]
    top = max(range(len(megas)), key=lambda m: lengths[megas[m][0]])
    megas[0][0], megas[top][0] = megas[top][0], megas[0][0]
    flat = [i for mb in megas for i in mb]
    return [flat[i : i + batch_size] for i in range(0, n, batch_size)]


# ---------------------------------------------------------------- model and step
def build_student(size: str, seed: int, device: torch.device) -> Qwen2ForCausalLM:
    if size not in MODEL_SIZES:
        raise ConfigError(f"model size {size!r}: choose one of {', '.join(MODEL_SIZES)}")
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        **MODEL_SIZES[size],
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        use_cache=False,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).to(device)


def load_student(path: str | Path, device: torch.device) -> PreTrainedModel:
    """An HF checkpoint as the student (float32 master weights, as the learner loads it)."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"--model {path}: not an HF checkpoint (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_attn_implementation("sdpa")
    return model.to(device)


@dataclass
class Layout:
    """How batches enter the model: packed (position ids) or padded (2D attention mask)."""

    padded: bool
    attention: str
    flatten: bool = False  # rows → one (1, B·T) row: the flash-attention varlen path


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: PackedBatch,
    targets: Targets,
    layout: Layout,
    spec: StepSpec,
    bf16: bool,
) -> tuple[float, torch.Tensor]:
    """The learner's optimizer step (at the spec's peak lr), timed to the end of its kernels;
    returns (seconds, detached loss)."""
    t0 = time.perf_counter()
    loss = optimizer_step(
        model,
        opt,
        batch,
        targets,
        spec,
        lr=spec.lr,
        step=0,
        bf16=bf16,
        padded=layout.padded,
        flatten=layout.flatten,
    )
    if loss.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, loss


def layout_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    targets: Targets,
    layout: Layout,
    spec: StepSpec,
    bf16: bool,
) -> float:
    """The learner's loss of ``batch`` entering the model as ``layout`` says (no step)."""
    with torch.no_grad():
        loss = step_loss(
            model, batch, targets, spec, bf16=bf16, padded=layout.padded, flatten=layout.flatten
        )
    return float(loss)


def with_attention(model: Qwen2ForCausalLM, attention: str) -> Qwen2ForCausalLM:
    m = copy.deepcopy(model)
    m.set_attn_implementation(known(attention))  # ours registered first
    return m


def pick_attention(
    base: Qwen2ForCausalLM,
    candidates: list[str],
    padded: bool,
    batches: list[PackedBatch],
    targets: Targets,
    reference: tuple[PackedBatch, Layout] | None,
    spec: StepSpec,
    bf16: bool,
    log: Callable[[str], None],
) -> tuple[str, dict[str, float], dict[str, float]]:
    """Fastest exact candidate: each trains throwaway copies on ``batches`` (first step untimed),
    candidates interleaved step by step. Returns (choice, seconds per step, loss error)."""
    tol = 5e-2 if bf16 else 1e-4
    errors: dict[str, float] = {}
    runs = {}
    ref_loss = None
    if reference is not None:
        ref_loss = layout_loss(base, reference[0], targets, reference[1], spec, bf16)
    for name in candidates:
        try:
            m = with_attention(base, name)
        except (ImportError, ValueError) as e:  # not installed / not supported here
            log(f"attention {name}: unavailable ({str(e).splitlines()[0][:80]})")
            continue
        layout = Layout(padded, name, flatten=name == "flash_attention_2" and not padded)
        if ref_loss is not None:
            errors[name] = abs(layout_loss(m, batches[0], targets, layout, spec, bf16) - ref_loss)
            if errors[name] > tol:
                log(f"attention {name}: not exact (|Δloss| = {errors[name]:.2e}), skipped")
                continue
        runs[name] = (m, make_optimizer(m, spec), layout, [])
    if not runs:
        raise ConfigError(
            f"no usable attention among {candidates}; install one or pick --attention"
        )
    for i, batch in enumerate(batches):
        for m, opt, layout, times in runs.values():
            dt, _ = train_step(m, opt, batch, targets, layout, spec, bf16)
            if i:
                times.append(dt)
    per_step = {n: sum(r[3]) / max(1, len(r[3])) for n, r in runs.items()}
    return min(per_step, key=per_step.get), per_step, errors


# ---------------------------------------------------------------- the pipeline's choice
@dataclass(frozen=True)
class RoundSpec(StepSpec):
    """``train_round``'s settings beyond one step, by ``TrainConfig``'s names and defaults (no
    pydantic on a bare box); ``epochs_per_round`` high so the steps asked for are taken."""

    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    steps_per_round: int = 1
    epochs_per_round: float = 100.0
    rows_per_step: int = 4


@dataclass(frozen=True)
class RowSpec:
    """``PackConfig``'s one field ``train_round`` reads."""

    max_seq_len: int


def kernel_selection(
    config: Any,
    dev: torch.device,
    rows_per_step: int,
    max_seq_len: int,
    seq_len: float,
    bf16: bool = False,
) -> dict[str, Any]:
    """What ``train.attention: auto`` picks for this student on these rows (one measurement,
    remembered by this process), with the probe's times and the device's candidates that could
    not run here and why (``unavailable``)."""
    shape = Shape.bucket(
        backward=True,
        rows=rows_per_step,
        row_len=max_seq_len,
        seq_len=seq_len,
        threads=torch.get_num_threads(),
        device=dev.type,
        dtype="bfloat16" if dev.type == "cuda" and bf16 else "float32",  # as stage_shapes
    )
    c = select(config, shape)
    return {
        "kernel": c.kernel,
        "source": c.source,
        "probe_s": c.seconds,
        "shape": asdict(shape),
        "unavailable": unavailable(dev.type, shape.dtype),
    }


def time_learner(
    base: PreTrainedModel,
    samples: list[Sample],
    targets: Targets,
    rows: list[list[int]],
    names: list[str],
    *,
    max_seq_len: int,
    rows_per_step: int,
    steps: int,
    bf16: bool,
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """``train_round`` (the NPD learner as the train stage calls it) on ``rows`` with each
    kernel in ``names``: copies of one initial student, the same rows in the same order. One
    untimed step each, then ``steps`` timed ones in two halves, the order of the kernels
    reversed for the second so that drifting background load hits all alike."""
    half = max(1, steps // 2)
    row_spec = RowSpec(max_seq_len)
    runs = {}
    for name in names:
        m = with_attention(base, name)
        runs[name] = {"model": m, "opt": make_optimizer(m, StepSpec()), "s": 0.0, "steps": 0}

    def go(name: str, n: int, start: int) -> Any:
        r = runs[name]
        spec = RoundSpec(steps_per_round=n, rows_per_step=rows_per_step)
        t0 = time.perf_counter()
        stats = train_round(
            r["model"], r["opt"], samples, targets, rows, spec, row_spec,  # type: ignore[arg-type]
            start_step=start, total_steps=1 + 2 * half, seed=seed, pad_id=0, bf16=bf16,
        )  # fmt: skip
        return time.perf_counter() - t0, stats

    first = {}
    for name in names:
        _, stats = go(name, 1, 0)
        first[name] = stats.log[0].loss
    for k, order in enumerate((names, names[::-1])):
        for name in order:
            dt, stats = go(name, half, 1 + k * half)
            runs[name]["s"] += dt
            runs[name]["steps"] += stats.steps
    out = {
        name: {
            "s_per_step": r["s"] / max(1, r["steps"]),
            "steps": r["steps"],
            "first_step_loss": first[name],
        }
        for name, r in runs.items()
    }
    ref = first[names[0]]
    log("learner: " + ", ".join(f"{n} {1e3 * v['s_per_step']:.1f} ms/step" for n, v in out.items()))
    return {
        "kernels": out,
        "fastest": min(out, key=lambda n: out[n]["s_per_step"]),
        "max_abs_first_loss_diff": max(abs(first[n] - ref) for n in names),
    }


# ---------------------------------------------------------------- the bench
def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_flops(dev: torch.device, peak_tflops: float | None) -> float | None:
    if peak_tflops:
        return peak_tflops * 1e12
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for key, v in PEAK_BF16 if key in name), None)


def run_bench(
    *,
    n_samples: int = 2048,
    lengths: list[tuple[int, int]] | None = None,
    median_len: float = 60.0,
    p99_len: float = 400.0,
    max_seq_len: int | None = None,
    rows_per_step: int = 4,
    model_size: str = "tiny",
    model: str | None = None,
    device: str = "auto",
    attention: str = "auto",
    padded_attention: str = "auto",
    bf16: bool | None = None,
    topk: int = 16,
    sft_weight: float = 0.0,
    mega_batch_mult: int = 0,
    calib_steps: int = 3,
    overlong: str = "truncate",
    peak_tflops: float | None = None,
    compile: bool = False,
    threads: int | None = None,
    learner_steps: int = 8,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Train the same student on the same samples packed and padded; return the figures.

    ``model``: an HF checkpoint to train instead of a random ``model_size`` student;
    ``learner_steps``: timed ``train_round`` steps per kernel (0: no ``learner`` section).

    ``threads``: torch's CPU intra-op threads for the run (restored afterwards); ``None`` = 1 on
    CPU, where the small student's ops gain nothing from a second thread and, on a shared box,
    every op waits at an OpenMP barrier for a descheduled thread (measured here: tiny ops 100×
    slower at load 5 on 2 cores, which buries both layouts in the same stalls); 0 = torch's default.
    """
    knobs = {k: v for k, v in locals().items() if k != "threads"}
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    n = (1 if cpu else 0) if threads is None else threads
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        return _run_bench(**knobs)
    finally:
        torch.set_num_threads(before)


def _run_bench(
    *,
    n_samples: int,
    lengths: list[tuple[int, int]] | None,
    median_len: float,
    p99_len: float,
    max_seq_len: int | None,
    rows_per_step: int,
    model_size: str,
    model: str | None,
    device: str,
    attention: str,
    padded_attention: str,
    bf16: bool | None,
    topk: int,
    sft_weight: float,
    mega_batch_mult: int,
    calib_steps: int,
    overlong: str,
    peak_tflops: float | None,
    compile: bool,
    learner_steps: int,
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    t_start = time.perf_counter()
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; use --device cpu")
    bf16 = dev.type == "cuda" if bf16 is None else bf16
    if rows_per_step < 1 or calib_steps < 2:
        raise ConfigError("need --rows-per-step >= 1 and --calib-steps >= 2")
    if overlong not in ("truncate", "drop"):
        raise ConfigError(f"--overlong {overlong!r}: use truncate or drop")
    register_varlen_attention()
    pairs = lengths or synthetic_lengths(n_samples, median_len, p99_len, seed)
    totals = sorted(p + r for p, r in pairs)
    p99 = totals[min(len(totals) - 1, math.ceil(0.99 * len(totals)) - 1)]
    msl = max_seq_len or 16 * math.ceil(2 * p99 / 16)
    base = load_student(model, dev) if model else build_student(model_size, seed, dev)
    vocab = base.config.vocab_size
    samples, _ = make_data(pairs, vocab, topk, seed)
    kept, _ = fit_lengths(samples, msl, overlong)  # a sample never spans two rows
    targets = targets_for(kept, vocab, topk, seed)  # on the CPU, as the learner keeps them
    spec = StepSpec(sft_weight=sft_weight)  # the default config's loss, lr and clip
    student = model or model_size
    log(f"{len(kept)} samples (p99 {p99}, max_seq_len {msl}), {student} student on {dev}")

    # packed schedule: BFD rows, rows_per_step rows a step
    rows = pack([len(s) for s in kept], msl, "bfd", seed)
    t0 = time.perf_counter()
    packed = [
        collate(kept, rows[i : i + rows_per_step], 0, row_len=msl, target_offsets=targets.offsets)
        for i in range(0, len(rows), rows_per_step)
    ]
    collate_packed_s = time.perf_counter() - t0
    # padded schedule: same samples per step on average, length-grouped, padded per batch
    batch_size = math.ceil(len(kept) / len(packed))
    groups = length_grouped_batches([len(s) for s in kept], batch_size, seed, mega_batch_mult)
    t0 = time.perf_counter()
    padded = [collate(kept, [[i] for i in g], 0, target_offsets=targets.offsets) for g in groups]
    collate_padded_s = time.perf_counter() - t0

    # attention: fastest exact per layout (forced choices skip the race, not the check)
    cand_packed, cand_padded = attention_candidates(dev, bf16)
    cand_packed = cand_packed if attention == "auto" else [attention]
    cand_padded = cand_padded if padded_attention == "auto" else [padded_attention]
    # the exactness reference: the first packed step's samples, one per row, 2D mask
    ref = collate(
        kept, [[i] for row in rows[:rows_per_step] for i in row], 0, target_offsets=targets.offsets
    )
    ref_layout = Layout(True, cand_padded[0])
    ref_model = with_attention(base, ref_layout.attention)
    # padded timing must see the longest batch and shorter ones (the first step is untimed)
    spread = max(1, len(padded) // calib_steps)
    calib_padded = [padded[-1], padded[0], *padded[spread::spread][: calib_steps - 2]]
    att_p, times_p, errs = pick_attention(
        ref_model,
        cand_packed,
        False,
        packed[:calib_steps],
        targets,
        (ref, ref_layout),
        spec,
        bf16,
        log,
    )
    att_b, times_b, _ = pick_attention(
        ref_model, cand_padded, True, calib_padded, targets, None, spec, bf16, log
    )
    del ref_model
    log(f"attention: packed {att_p} {times_p}, padded {att_b} {times_b}")

    # the run: two copies of one initial student, steps alternating
    lay_p = Layout(False, att_p, flatten=att_p == "flash_attention_2")
    lay_b = Layout(True, att_b)
    m_p, m_b = with_attention(base, att_p), with_attention(base, att_b)
    if compile:
        m_p, m_b = torch.compile(m_p), torch.compile(m_b, dynamic=True)
    opt_p, opt_b = make_optimizer(m_p, spec), make_optimizer(m_b, spec)
    sec = {"packed": 0.0, "padded": 0.0}
    loss_sum = {"packed": torch.zeros((), device=dev), "padded": torch.zeros((), device=dev)}
    jobs = {"packed": (m_p, opt_p, packed, lay_p), "padded": (m_b, opt_b, padded, lay_b)}
    n_steps = max(len(packed), len(padded))
    for i in range(n_steps):
        order = ["packed", "padded"] if i % 2 == 0 else ["padded", "packed"]
        for name in order:
            m, opt, sched, lay = jobs[name]
            if i < len(sched):
                dt, loss = train_step(m, opt, sched[i], targets, lay, spec, bf16)
                sec[name] += dt
                loss_sum[name] += loss
        if i % 10 == 9:
            log(f"step {i + 1}/{n_steps}: packed {sec['packed']:.1f}s, padded {sec['padded']:.1f}s")

    def stats(batches: list[PackedBatch]) -> tuple[int, int, int]:
        return (
            sum(b.n_loss_tokens for b in batches),
            sum(b.n_real_tokens for b in batches),
            sum(b.input_ids.numel() for b in batches),
        )

    resp, real, cap = stats(packed)
    resp_b, real_b, cap_b = stats(padded)
    # what the same grouping gives on a large dataset (the Trainer's cap: 50 batches a mega-batch)
    lens = [len(s) for s in kept]
    big = length_grouped_batches(lens, batch_size, seed, 50)
    fill_50 = real / sum(len(g) * max(lens[i] for i in g) for g in big)
    assert (resp, real) == (resp_b, real_b), "both layouts must hold the same tokens"
    n_params = sum(p.numel() for p in base.parameters())
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn_flops = (
        6
        * cfg.num_hidden_layers
        * cfg.num_attention_heads
        * head_dim
        * sum(len(s) ** 2 for s in kept)
    )
    useful = 6 * n_params * real + attn_flops
    peak = peak_flops(dev, peak_tflops)
    mean_len = sum(totals) / len(totals)
    selection = kernel_selection(base.config, dev, rows_per_step, msl, mean_len, bf16)
    log(f"selection (train.attention: auto): {selection['kernel']} {selection['probe_s']}")
    for name, why in selection["unavailable"].items():
        log(f"selection: {name} not a candidate here ({why})")
    learner = None
    if learner_steps > 0:
        names = kernels(dev.type, selection["shape"]["dtype"]) or [att_p]
        learner = time_learner(
            base, kept, targets, rows, names, max_seq_len=msl, rows_per_step=rows_per_step,
            steps=learner_steps, bf16=bf16, seed=seed, log=log,
        )  # fmt: skip
    out = {
        "fill_ratio": real / cap,
        "padded_fill_ratio": real_b / cap_b,
        "padded_fill_ratio_mega50": fill_50,
        "fill_bound_speedup": (real / cap) / (real_b / cap_b),  # if time ∝ tokens incl. pad
        "packed_tokens_per_s": resp / sec["packed"],
        "padded_tokens_per_s": resp / sec["padded"],
        "speedup": sec["padded"] / sec["packed"],
        "attention": att_p,
        "padded_attention": att_b,
        "device": device_name(dev),
        "max_seq_len": msl,
        "n_samples": len(pairs),
        "n_kept": len(kept),
        "p99_len": p99,
        "median_len": totals[len(totals) // 2],
        "mean_len": mean_len,
        "model_size": model_size if model is None else None,
        "model": model,
        "params": n_params,
        "bf16": bf16,
        "loss": "forward_kl_topk" + (f" + {sft_weight} sft" if sft_weight else ""),
        "rows_per_step": rows_per_step,
        "padded_batch_size": batch_size,
        "mega_batch_mult": mega_batch_mult or max(1, min(len(kept) // (batch_size * 4), 50)),
        "steps_packed": len(packed),
        "steps_padded": len(padded),
        "response_tokens": resp,
        "real_tokens": real,
        "packed_real_tokens_per_s": real / sec["packed"],
        "padded_real_tokens_per_s": real / sec["padded"],
        "packed_seconds": sec["packed"],
        "padded_seconds": sec["padded"],
        "packed_mean_loss": float(loss_sum["packed"]) / len(packed),
        "padded_mean_loss": float(loss_sum["padded"]) / len(padded),
        "attention_s_per_step": {"packed": times_p, "padded": times_b},
        "exact_check_abs_loss_diff": errs,
        "collate_seconds": {"packed": collate_packed_s, "padded": collate_padded_s},
        "selection": selection,
        "learner": learner,
        "packed_mfu": useful / sec["packed"] / peak if peak else None,
        "padded_mfu": useful / sec["padded"] / peak if peak else None,
        "peak_flops": peak,
        "mfu_formula": "(6*params*real_tokens + 6*layers*heads*head_dim*sum(L^2)) / s / peak",
        "torch": torch.__version__,
        "seed": seed,
        "wall_seconds": time.perf_counter() - t_start,
    }
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m npd_core.bench.packing", description=__doc__.split("\n")[0]
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--n-samples", type=int, default=2048)
    p.add_argument("--lengths", help="file of prompt/response length pairs (default: synthetic)")
    p.add_argument("--median-len", type=float, default=60.0)
    p.add_argument("--p99-len", type=float, default=400.0)
    p.add_argument("--max-seq-len", type=int, default=None, help="default: 2 x p99 sample length")
    p.add_argument("--rows-per-step", type=int, default=4)
    p.add_argument("--model-size", choices=list(MODEL_SIZES), default="tiny")
    p.add_argument("--model", default=None, help="HF checkpoint dir to train (default: random)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--attention",
        default="auto",
        help="packed: auto, sdpa, eager, sdpa_varlen; CUDA: torch_varlen, flex_document, "
        "flash_varlen (attention.KERNELS), flash_attention_2 (rows flattened to one)",
    )
    p.add_argument("--padded-attention", default="auto", help="padded baseline: auto, sdpa, ...")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA, off for CPU)",
    )
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--sft-weight", type=float, default=0.0)
    p.add_argument("--mega-batch-mult", type=int, default=0, help="0 = Trainer's rule")
    p.add_argument("--calib-steps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU; CUDA: looked up")
    p.add_argument("--compile", action="store_true", help="torch.compile both students")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1; 0 = torch's)")
    p.add_argument(
        "--learner-steps", type=int, default=8, help="timed train_round steps per kernel (0: off)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    kw = {k: v for k, v in vars(a).items() if k not in ("json", "lengths", "quiet")}
    log = (lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        lens = read_lengths(a.lengths) if a.lengths else None
        res = run_bench(lengths=lens, log=log, **kw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:28} {v:.4g}" if isinstance(v, float) else f"{k:28} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
