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
   (``npd_core.pipeline.autotune.select``, what ``train.attention: auto`` records in a run's spec)
   and times the real learner, ``train_round`` as the train stage calls it (collation included),
   with each exact kernel of the device: ``selection`` and ``learner`` in the output (on CUDA
   the candidates are ``autotune.KERNELS["cuda"]``; ``selection.unavailable`` names those that
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
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from importlib.util import find_spec
from typing import Any

import torch
from transformers import PreTrainedModel, Qwen2ForCausalLM

from npd_core.bench.workload import (
    MODEL_SIZES,
    Layout,
    build_student,
    device_name,
    layout_loss,
    length_grouped_batches,
    load_student,
    make_data,
    peak_flops,
    read_lengths,
    synthetic_lengths,
    targets_for,
    train_step,
    with_attention,
)
from npd_core.errors import ConfigError
from npd_core.method.attention import VARLEN, register_varlen_attention
from npd_core.method.optim import make_optimizer
from npd_core.method.packing import PackedBatch, Sample, collate, fit_lengths, pack
from npd_core.method.train import StepSpec, Targets, train_round
from npd_core.pipeline.autotune import Shape, kernels, race, select, unavailable


def attention_candidates(device: torch.device, bf16: bool = False) -> tuple[list[str], list[str]]:
    """Exact attention implementations to try: (packed, padded). CUDA: the pipeline's CUDA
    candidates that run here (``autotune.KERNELS``; bf16 autocast lets the flash kernels in)
    and per-sequence SDPA; padded, SDPA and transformers' flash_attention_2 where flash-attn is
    importable. CPU: the pipeline's candidates (flex attention has no CPU backward), and eager."""
    if device.type == "cuda":
        fa = ["flash_attention_2"] if find_spec("flash_attn") else []
        dtype = "bfloat16" if bf16 else "float32"
        return [*kernels("cuda", dtype), VARLEN], fa + ["sdpa"]
    return [*kernels(device.type), "eager"], ["sdpa", "eager"]


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
    """Fastest exact candidate: each trains a throwaway copy on ``batches`` (the first step
    untimed), the candidates raced step by step (``autotune.race``). Returns (choice, seconds
    per step, loss error)."""
    tol = 5e-2 if bf16 else 1e-4
    errors: dict[str, float] = {}
    steps: dict[str, Callable[[int], float]] = {}
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
        steps[name] = partial(
            _step_of, m, make_optimizer(m, spec), batches, targets, layout, spec, bf16
        )
    times = race(steps, len(batches) - 1)
    if not times:
        raise ConfigError(
            f"no usable attention among {candidates}; install one or pick --attention"
        )
    per_step = {n: sum(t) / max(1, len(t)) for n, t in times.items()}
    return min(per_step, key=per_step.get), per_step, errors


def _step_of(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[PackedBatch],
    targets: Targets,
    layout: Layout,
    spec: StepSpec,
    bf16: bool,
    i: int,
) -> float:
    """Seconds of step ``i`` (on ``batches[i]``) of one candidate's race."""
    return train_step(model, opt, batches[i], targets, layout, spec, bf16)[0]


# ---------------------------------------------------------------- the pipeline's choice
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
    shape = Shape.learner(
        rows=rows_per_step,
        row_len=max_seq_len,
        seq_len=seq_len,
        threads=torch.get_num_threads(),
        device=dev.type,
        bf16=bf16,
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
    kernel in ``names``: copies of one initial student, the same rows in the same order, raced
    (``autotune.race``): one untimed step each, then ``steps`` timed ones in two halves, the
    kernels taking turns in reversed order for the second. The learner's default settings,
    ``epochs_per_round`` high so that the steps asked for are taken."""
    half = max(1, steps // 2)
    spec = StepSpec(rows_per_step=rows_per_step, epochs_per_round=100.0)
    first: dict[str, float] = {}
    taken = dict.fromkeys(names, 0)

    def go(name: str) -> Callable[[int], float]:
        model = with_attention(base, name)
        opt = make_optimizer(model, spec)

        def run(i: int) -> float:
            n, start = (1, 0) if i == 0 else (half, 1 + (i - 1) * half)
            t0 = time.perf_counter()
            stats = train_round(
                model, opt, samples, targets, rows, replace(spec, steps_per_round=n), max_seq_len,
                start_step=start, total_steps=1 + 2 * half, seed=seed, pad_id=0, bf16=bf16,
            )  # fmt: skip
            dt = time.perf_counter() - t0
            if i == 0:
                first[name] = stats.log[0].loss
            else:
                taken[name] += stats.steps
            return dt

        return run

    times = race({name: go(name) for name in names}, 2)
    out = {
        name: {
            "s_per_step": sum(t) / max(1, taken[name]),
            "steps": taken[name],
            "first_step_loss": first[name],
        }
        for name, t in times.items()
    }
    ref = first[next(iter(out))]
    log("learner: " + ", ".join(f"{n} {1e3 * v['s_per_step']:.1f} ms/step" for n, v in out.items()))
    return {
        "kernels": out,
        "fastest": min(out, key=lambda n: out[n]["s_per_step"]),
        "max_abs_first_loss_diff": max(abs(first[n] - ref) for n in out),
    }


# ---------------------------------------------------------------- the bench
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
        "flash_varlen (autotune.KERNELS), flash_attention_2 (rows flattened to one)",
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
