"""GPU bench: throughput, MFU and the on-policy cost profile of the method at real model sizes.

    python -m npd_core.bench.gpu --json [--tiny] [--out FILE] [--box SECTION=SECONDS ...]

Needs torch ≥ 2.11 and transformers ≥ 5.17 only (no vLLM, flash-attn or network): the minimum a
CUDA box brings. Random-weight Qwen2 models are built in memory from a config: the student has
Qwen2.5-0.5B's shapes, the teacher Qwen2.5-3B's (both with tied embeddings, as those models).
Frozen models run in bf16 on CUDA; the student trains as the learner does, fp32 master weights
under bf16 autocast. ``--tiny`` runs the same code at toy sizes on the CPU (fp32) for the tests.

Sections, in order, each under a wall-clock box (checked between units of work, with a hard
SIGALRM cut as a backstop); the JSON is rewritten after every section, so a run cut off from
outside still reports what finished, and a section that runs out says ``"truncated": true``:

1. ``device``: GPU, versions, the dense bf16 peak used for MFU, parameter counts.
2. ``train``: packed training tokens/s and MFU of the student per packed-attention choice, with
   the learner's own step (``method.train.optimizer_step``, default loss/lr/clip) on rows packed
   and collated by ``method.packing``.
3. ``generate``: student decoding tokens/s at several batch sizes, fixed response length (the
   project's sampler, ``method.generate.generate``, with an EOS id outside the vocabulary).
4. ``score``: teacher scoring tokens/s in the score stage's layout, top-k and token
   log-likelihoods computed chunk by chunk from the last hidden state, by the score stage's own
   ``method.score.response_scores``.
5. ``onpolicy_step``: one synchronous on-policy step as the ``onpolicy`` baseline takes it
   (generate with the live student → teacher top-k → one update on the padded batch).
6. ``projection``: the per-sample cost split at the measured rates, and the cost model's
   NPD-vs-on-policy speedup at these sizes (``cost.project``: this device's rates with the
   sample efficiency of a bench JSON's seed-0 curves, ``--cost-bench``; by default the
   long-answer world's ``docs/bench-long.json`` if onpolicy gained there, else the toy world's).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from npd_core.atomic import atomic_file
from npd_core.bench import cost
from npd_core.bench.workload import make_data, peak_flops, synthetic_lengths
from npd_core.errors import first_line
from npd_core.jsonsafe import finite
from npd_core.method.attention import VARLEN, register_cuda_attention, register_varlen_attention
from npd_core.method.generate import generate
from npd_core.method.optim import make_optimizer
from npd_core.method.packing import (
    IGNORE_INDEX,
    PackedBatch,
    Sample,
    best_fit_decreasing,
    collate,
    pack,
    response_offsets,
)
from npd_core.method.score import response_scores
from npd_core.method.train import StepSpec, Targets, optimizer_step, step_loss
from npd_core.pipeline.autotune import KERNELS, unavailable

DOCS_BENCHES = tuple(
    Path(__file__).resolve().parents[2] / "docs" / f"bench-{w}.json" for w in ("long", "toy")
)  # the projection's default sample efficiency: the long-answer world's, else the toy's


def default_cost_bench() -> Path:
    """The first of ``DOCS_BENCHES`` with something to project (``cost.projection_target``
    above the start: the long world's bench has none), else the first that exists."""
    found = [f for f in DOCS_BENCHES if f.is_file()]
    for f in found:
        start, target = cost.projection_target(json.loads(f.read_text()))
        if target > start:
            return f
    return found[0] if found else DOCS_BENCHES[0]


SECTIONS = ("device", "train", "generate", "score", "onpolicy_step", "projection")
MFU_FORMULA = (
    "(6 * params * tokens_per_step + 6 * layers * heads * head_dim * sum_seq_len_sq) "
    "/ step_s / peak_flops"
)

# Qwen2.5 shapes (hidden, layers, heads, kv heads, intermediate, vocab); head size 64 throughout.
STUDENT = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
)
TEACHER = dict(
    hidden_size=2048,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    intermediate_size=11008,
    vocab_size=151936,
)
TINY_STUDENT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=320,
)
TINY_TEACHER = dict(TINY_STUDENT, num_hidden_layers=3, intermediate_size=192)


@dataclass(frozen=True)
class Plan:
    """Workload sizes and time boxes (seconds) of one run."""

    student: dict[str, int]
    teacher: dict[str, int]
    row_tokens: int  # packed tokens per training micro-batch (one row)
    median_len: float  # training samples' length mix (log-normal)
    p99_len: float
    warm_steps: int
    timed_steps: int
    gen_batches: tuple[int, ...]
    prompt_len: int  # prompts are prompt_len ± prompt_len // 8 tokens
    new_tokens: int
    score_samples: int
    score_batch_tokens: int
    score_chunk: int  # response positions per top-k chunk
    onpolicy_prompts: int
    onpolicy_steps: int  # the last one is reported, the others warm up
    top_k: int = 16
    profile: bool = True
    boxes: dict[str, float] = field(default_factory=dict)


GPU_PLAN = Plan(
    student=STUDENT,
    teacher=TEACHER,
    row_tokens=16384,
    median_len=512,
    p99_len=4096,
    warm_steps=1,
    timed_steps=2,
    gen_batches=(8, 32, 128, 512, 1024),
    prompt_len=64,
    new_tokens=128,
    score_samples=512,
    score_batch_tokens=32768,
    score_chunk=4096,
    onpolicy_prompts=128,
    onpolicy_steps=1,  # the earlier sections warmed its kernels; a second costs ~15 s
    boxes=dict(device=30, train=60, generate=90, score=15, onpolicy_step=30, projection=5),
)
TINY_PLAN = Plan(
    student=TINY_STUDENT,
    teacher=TINY_TEACHER,
    row_tokens=256,
    median_len=24,
    p99_len=96,
    warm_steps=1,
    timed_steps=2,
    gen_batches=(8, 32, 128, 512, 1024),
    prompt_len=8,
    new_tokens=8,
    score_samples=64,
    score_batch_tokens=1024,
    score_chunk=128,
    onpolicy_prompts=32,
    onpolicy_steps=1,
    profile=False,
    # seconds of work each when the machine is idle; the boxes only bound a loaded machine (the
    # tests run it beside other work and must not depend on how fast it is)
    boxes=dict(device=60, train=60, generate=60, score=60, onpolicy_step=60, projection=30),
)


# ---------------------------------------------------------------- time boxes
HARD_GRACE_S = 10.0  # a section is cut this long (or half its box) after its box ends


class Overrun(Exception):
    """The hard cut of a section that overran its box by the grace time."""


class TimeBox:
    """A section's wall-clock box. Checked between units of work: the first unit always runs
    (a box reports what it measured, not nothing), a later one only inside the box."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.perf_counter() + seconds
        self.truncated = False

    def expired(self) -> bool:
        if time.perf_counter() >= self.deadline:
            self.truncated = True
        return self.truncated


@contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Overrun` in the main thread after ``seconds`` (a no-op elsewhere): a unit
    that hangs (a compile, a huge batch) cannot take the whole run with it."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Overrun(f"hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- packed attention
def attention_choices(dev: torch.device, bf16: bool) -> list[tuple[str, str, str | None]]:
    """(name, what it is, why unavailable or None): every CUDA candidate of the pipeline's own
    choice (``pipeline.autotune.KERNELS["cuda"]``, what ``train.attention: auto`` races on a GPU),
    then per-sequence SDPA (the CPU learner's kernel) for comparison."""
    dtype = "bfloat16" if bf16 else "float32"  # what the learner computes in (autocast)
    why = unavailable("cuda", dtype)
    if dev.type != "cuda":  # --tiny: a CPU cannot run what needs CUDA, whatever this box has
        why = {k.name: why.get(k.name) or "CUDA only" for k in KERNELS["cuda"] if k.missing}
    out = [(k.name, k.what, why.get(k.name)) for k in KERNELS["cuda"]]
    return [*out, (VARLEN, "per-sequence SDPA (the CPU learner's kernel)", None)]


# ---------------------------------------------------------------- models and helpers
def build_model(shape: dict[str, int], dtype: torch.dtype, dev: torch.device) -> Qwen2ForCausalLM:
    """A random-weight Qwen2 causal LM built on ``dev`` directly (no host copy, no download)."""
    cfg = Qwen2Config(
        **shape,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        use_cache=False,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    return model


def n_params(model: torch.nn.Module) -> int:
    """Parameters counted once (tied embeddings once): the N of 6·N FLOPs per token."""
    return sum(p.numel() for p in model.parameters())


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length ± length // 8`` random token ids (ids 0..2 left out)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(length - length // 8, length + length // 8 + 1, (n,), generator=g)
    return [torch.randint(3, vocab, (int(L),), generator=g).tolist() for L in lens]


def top_kernels(prof: Any, n: int = 8) -> list[dict[str, Any]]:
    """The ``n`` kernels with the most device time in a ``torch.profiler`` run."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:120], "ms": t / 1e3, "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["ms"] / total
    return rows[:n]


@contextmanager
def profiled(enabled: bool, dev: torch.device, res: dict[str, Any], key: str) -> Iterator[None]:
    """Profile the block's device kernels into ``res[key]`` (CUDA and ``enabled`` only)."""
    if not enabled or dev.type != "cuda":
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield
    res[key] = top_kernels(prof)


# ---------------------------------------------------------------- the bench
@dataclass
class Bench:
    """What the sections share: the plan, the device and the models."""

    plan: Plan
    dev: torch.device
    bf16: bool
    seed: int = 0
    peak_tflops: float | None = None
    student: Qwen2ForCausalLM | None = None
    teacher: Qwen2ForCausalLM | None = None
    optimizer: torch.optim.Optimizer | None = None
    report: dict[str, Any] = field(default_factory=dict)
    spec: StepSpec = field(default_factory=StepSpec)
    cost_bench: Path | None = None  # the bench JSON whose sample efficiency ``projection`` uses
    log: Callable[[str], None] = lambda m: None


def section_device(b: Bench, box: TimeBox, res: dict[str, Any]) -> None:
    """Device, versions, peak, and the two models (built here; their build time is reported)."""
    dev = b.dev
    res["torch"] = torch.__version__
    res["transformers"] = transformers.__version__
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        res["name"] = props.name
        res["memory_gib"] = props.total_memory / 2**30
        res["capability"] = f"{props.major}.{props.minor}"
    else:
        res["name"] = f"cpu ({torch.get_num_threads()} threads)"
    peak = peak_flops(dev, b.peak_tflops)
    source = "--peak-tflops" if b.peak_tflops else "datasheet dense bf16, by device name"
    if peak is None:  # CPU or an unknown GPU: a measured matmul rate stands in for a datasheet
        peak, source = _measured_matmul_flops(dev, b.bf16), "measured matmul (no datasheet)"
    res["peak_flops"] = peak
    res["peak_source"] = source
    res["peak_table"] = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H200": 989e12}
    t0 = time.perf_counter()
    torch.manual_seed(b.seed)
    b.student = build_model(b.plan.student, torch.float32, dev)  # fp32 master weights
    b.optimizer = make_optimizer(b.student, b.spec)
    b.teacher = build_model(b.plan.teacher, torch.bfloat16 if b.bf16 else torch.float32, dev)
    b.teacher.eval().requires_grad_(False)
    sync(dev)
    res["build_s"] = time.perf_counter() - t0
    res["student"] = {
        "shape": b.plan.student,
        "params": n_params(b.student),
        "like": "Qwen2.5-0.5B" if b.plan.student == STUDENT else "toy",
        "precision": "fp32 master weights, bf16 autocast" if b.bf16 else "fp32",
    }
    res["teacher"] = {
        "shape": b.plan.teacher,
        "params": n_params(b.teacher),
        "like": "Qwen2.5-3B" if b.plan.teacher == TEACHER else "toy",
        "precision": "bf16 weights (frozen)" if b.bf16 else "fp32 (frozen, CPU)",
    }
    res["tied_embeddings"] = True
    res["launch_overhead_us"] = _launch_overhead_us(dev)
    res["cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")


def _launch_overhead_us(dev: torch.device, n: int = 2000) -> float:
    """Host time per tiny op (one kernel launch on CUDA), in µs: the floor of every eager step
    that issues many small kernels, as HF decoding does (a few hundred per token)."""
    x = torch.zeros(8, device=dev)
    for _ in range(100):
        x.add_(1)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    sync(dev)
    return (time.perf_counter() - t0) / n * 1e6


def _measured_matmul_flops(dev: torch.device, bf16: bool) -> float:
    n = 4096 if dev.type == "cuda" else 256
    dt = torch.bfloat16 if bf16 else torch.float32
    a, c = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    for _ in range(2):
        a @ c
    sync(dev)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ c
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def section_train(b: Bench, box: TimeBox, res: dict[str, Any]) -> None:
    """Packed training tokens/s and MFU per attention choice: same rows, same learner step."""
    p, dev, model = b.plan, b.dev, b.student
    assert model is not None and b.optimizer is not None
    cfg = model.config
    peak = b.report["device"]["peak_flops"]
    N = n_params(model)
    res.update(
        mfu_formula=MFU_FORMULA,
        attention_flops_note=(
            "causal attention, useful FLOPs only: 2·L²·heads·head_dim per layer forward "
            "(QKᵀ and PV, half the square), ×3 with backward; masked or padded work is not "
            "counted. PaLM's 12·layers·hidden·L² counts the full square (twice this term)."
        ),
        params=N,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        peak_flops=peak,
        loss="forward_kl_topk (StepSpec defaults: lr, clip, AdamW β 0.9/0.95)",
        step="npd_core.method.train.optimizer_step (forward, loss, backward, clip, AdamW step)",
        warm_steps=p.warm_steps,
        timed_steps=p.timed_steps,
        project_default_on_cuda=(
            "train.attention: auto races the available CUDA choices below at a run's start "
            "(pipeline.autotune.select); without a choice (NPD_ATTENTION=fixed) the model's sdpa"
        ),
        choices={},
    )
    row_tokens = p.row_tokens
    choices = attention_choices(dev, b.bf16)
    i = measured = 0
    try:
        while i < len(choices):
            name, what, why = choices[i]
            out: dict[str, Any] = {"what": what, "available": why is None}
            res["choices"][name] = out
            i += 1
            if why is not None:
                out["why"] = why
                continue
            if measured and box.expired():
                out["skipped"] = "time box"
                continue
            measured += 1
            oom = False
            b.log(f"train: {name}, rows of {row_tokens} tokens")
            try:
                out.update(_train_choice(b, name, row_tokens, peak, N))
            except torch.OutOfMemoryError:
                oom = True  # handled below, once the failed step's tensors are released
            except Overrun:
                out["cut"] = "hard time limit"
                raise
            except Exception as e:  # noqa: BLE001 - a choice that fails is reported, not fatal
                out.update(available=False, why=f"{type(e).__name__}: {first_line(e)[:200]}")
            finally:
                model.set_attn_implementation("sdpa")
            if "tokens_per_s" in out:
                b.log(f"train: {name}, {out['tokens_per_s']:.0f} tokens/s, MFU {out['mfu']:.3f}")
            if oom:
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if row_tokens <= 1024:
                    out.update(available=False, why="out of memory at 1024 tokens a row")
                    continue
                row_tokens //= 2  # this choice again, and the rest, on shorter rows
                res["row_tokens_reduced"] = f"out of memory: rows of {row_tokens} tokens"
                i -= 1
    finally:
        _best_choice(res)
    if "best" in res and p.profile and not box.expired():
        batches, targets = _train_rows(b, row_tokens, 1)
        model.set_attn_implementation(res["best"])
        try:
            with profiled(True, dev, res, "profile_top_kernels"):
                optimizer_step(model, b.optimizer, batches[0], targets, b.spec, lr=0.0, step=0)
                sync(dev)
        finally:
            model.set_attn_implementation("sdpa")


def _best_choice(res: dict[str, Any]) -> None:
    """The fastest measured choice, also when the section was cut short."""
    timed = {n: c for n, c in res["choices"].items() if "tokens_per_s" in c}
    if timed:
        best = max(timed, key=lambda n: timed[n]["tokens_per_s"])
        res.update(best=best, best_tokens_per_s=timed[best]["tokens_per_s"])
        res["best_mfu"] = timed[best]["mfu"]


def _train_rows(b: Bench, row_tokens: int, n_rows: int) -> tuple[list[PackedBatch], Targets]:
    """``n_rows`` full packed rows (BFD, one row a micro-batch) of random samples with random
    teacher top-k targets (the packing bench's data), collated as the learner does."""
    p = b.plan
    vocab = p.student["vocab_size"]
    mean = p.median_len * math.exp(0.5 * (math.log(p.p99_len / p.median_len) / 2.3263) ** 2)
    n = math.ceil(1.6 * (n_rows + 1) * row_tokens / mean)
    pairs = [
        (pr, min(r, row_tokens - pr))
        for pr, r in synthetic_lengths(n, p.median_len, p.p99_len, b.seed)
        if pr < row_tokens
    ]
    samples, targets = make_data(pairs, vocab, p.top_k, b.seed)
    rows = pack([len(s) for s in samples], row_tokens, "bfd", b.seed)
    rows.sort(key=lambda r: -sum(len(samples[i]) for i in r))  # the fullest rows
    batches = [
        collate(samples, [r], 0, row_len=row_tokens, target_offsets=targets.offsets)
        for r in rows[:n_rows]
    ]
    return batches, targets


def _train_choice(b: Bench, name: str, row_tokens: int, peak: float, N: int) -> dict[str, Any]:
    """Warm-up then timed learner steps with attention ``name``; the first warm-up step's loss
    is compared with per-sequence SDPA's on the same weights (exactness, not speed)."""
    p, dev, model, opt = b.plan, b.dev, b.student, b.optimizer
    assert model is not None and opt is not None
    cfg = model.config
    batches, targets = _train_rows(b, row_tokens, p.warm_steps + p.timed_steps)
    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.set_attn_implementation(VARLEN)
    with torch.no_grad():
        ref = float(step_loss(model, batches[0], targets, b.spec, bf16=b.bf16))
    model.set_attn_implementation(name)
    t_first = time.perf_counter()
    times, losses = [], []
    for j, batch in enumerate(batches):
        sync(dev)
        t0 = time.perf_counter()
        loss = optimizer_step(model, opt, batch, targets, b.spec, lr=b.spec.lr, step=j, bf16=b.bf16)
        sync(dev)
        losses.append(float(loss))
        if j >= p.warm_steps:
            times.append(time.perf_counter() - t0)
        if j == p.warm_steps - 1 or (p.warm_steps == 0 and j == 0):
            warm_s = time.perf_counter() - t_first
    timed = batches[p.warm_steps :]
    tokens = [bt.n_real_tokens for bt in timed]
    sum_sq = [
        sum((c[k + 1] - c[k]) ** 2 for c in bt.cu_seqlens for k in range(len(c) - 1))
        for bt in timed
    ]
    step_s = sum(times) / len(times)
    tokens_per_step = sum(tokens) / len(tokens)
    sum_seq_len_sq = sum(sum_sq) / len(sum_sq)
    flops = (
        6 * N * tokens_per_step
        + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * sum_seq_len_sq
    )
    out = {
        "row_tokens": row_tokens,
        "rows_per_step": 1,
        "tokens_per_step": tokens_per_step,
        "sequences_per_step": sum(len(bt.cu_seqlens[0]) - 1 for bt in timed) / len(timed),
        "sum_seq_len_sq": sum_seq_len_sq,
        "step_s": step_s,
        "step_s_each": times,
        "tokens_per_s": tokens_per_step / step_s,
        "mfu": flops / step_s / peak,
        "warmup_s": warm_s,
        "first_loss": losses[0],
        "abs_loss_diff_vs_sdpa_varlen": abs(losses[0] - ref),
    }
    if dev.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def _generator_copy(b: Bench) -> Qwen2ForCausalLM:
    """The generator snapshot: a frozen copy of the student in the frozen dtype (bf16 on CUDA)."""
    assert b.student is not None
    gen = copy.deepcopy(b.student).to(torch.bfloat16 if b.bf16 else torch.float32)
    gen.set_attn_implementation("sdpa")
    return gen.eval().requires_grad_(False)


def _decode(
    model: Qwen2ForCausalLM, prompts: list[list[int]], new_tokens: int, b: Bench, seed: int
) -> float:
    """Decode ``new_tokens`` for every prompt in one batch with the project's sampler (T = 1,
    per-sample seeds, EOS id -1: outside the vocabulary, so never emitted); seconds taken."""
    sync(b.dev)
    t0 = time.perf_counter()
    generate(
        model,
        prompts,
        n_per_prompt=1,
        max_new_tokens=new_tokens,
        eos_ids={-1},
        pad_id=0,
        temperature=1.0,
        top_p=1.0,
        seeds=[[seed + i] for i in range(len(prompts))],
        batch_size=len(prompts),
        bf16=b.bf16,
        halve_on_oom=False,  # a batch that does not fit is reported, not timed at half
    )
    sync(b.dev)
    return time.perf_counter() - t0


def section_generate(b: Bench, box: TimeBox, res: dict[str, Any]) -> None:
    """Student decoding tokens/s per batch size, fixed response length, EOS ignored."""
    p = b.plan
    gen = _generator_copy(b)
    vocab = p.student["vocab_size"]
    res.update(
        engine="npd_core.method.generate.generate (HF model, KV cache, per-sample Gumbel-max)",
        eos="ignored: EOS id -1 is outside the vocabulary, every row decodes new_tokens",
        model="student snapshot in " + ("bf16" if b.bf16 else "fp32"),
        prompt_len=p.prompt_len,
        new_tokens=p.new_tokens,
        tokens_counted="generated tokens (batch × new_tokens); prompt prefill is in the time",
        temperature=1.0,
        batches={},
    )
    for i, B in enumerate(p.gen_batches):
        if i and box.expired():
            res["batches"][str(B)] = {"skipped": "time box"}
            continue
        prompts = random_prompts(B, p.prompt_len, vocab, b.seed + B)
        _decode(gen, prompts, 2, b, b.seed)  # warm-up: this batch's shapes
        s = _decode(gen, prompts, p.new_tokens, b, b.seed)
        res["batches"][str(B)] = {"seconds": s, "tokens_per_s": B * p.new_tokens / s}
        b.log(f"generate: batch {B}, {B * p.new_tokens / s:.0f} tokens/s")
    tps = {B: v["tokens_per_s"] for B, v in res["batches"].items() if "tokens_per_s" in v}
    lo, hi = str(min(p.gen_batches)), str(max(p.gen_batches))
    if lo in tps and hi in tps:
        res[f"ratio_batch{hi}_over_batch{lo}"] = tps[hi] / tps[lo]
    if p.profile and hi in tps and not box.expired():
        prompts = random_prompts(int(hi), p.prompt_len, vocab, b.seed)
        with profiled(True, b.dev, res, f"profile_top_kernels_batch{hi}_4_tokens"):
            _decode(gen, prompts, 4, b, b.seed)
    del gen


def _score_batches(b: Bench, samples: list[Sample]) -> tuple[list[PackedBatch], list[int]]:
    """The score stage's layout: BFD rows of the longest sample's length, ``score_batch_tokens``
    per forward; target offsets index the flat response-position table."""
    p = b.plan
    offsets = response_offsets(samples)
    row_len = max(len(s) for s in samples)
    rows = best_fit_decreasing([len(s) for s in samples], row_len)
    per = max(1, p.score_batch_tokens // row_len)
    batches = [
        collate(samples, rows[i : i + per], 0, row_len=row_len, target_offsets=offsets)
        for i in range(0, len(rows), per)
    ]
    return batches, offsets


def section_score(b: Bench, box: TimeBox, res: dict[str, Any]) -> None:
    """Teacher scoring tokens/s: prefill of prompt + response, chunked top-k, token log-probs."""
    p, dev, teacher = b.plan, b.dev, b.teacher
    assert teacher is not None
    vocab = p.teacher["vocab_size"]
    g = torch.Generator().manual_seed(b.seed + 7)
    prompts = random_prompts(p.score_samples, p.prompt_len, vocab, b.seed + 7)
    samples = [
        Sample(pr, torch.randint(3, vocab, (p.new_tokens,), generator=g).tolist()) for pr in prompts
    ]
    batches, _ = _score_batches(b, samples)
    res.update(
        path=(
            "score stage's layout (BFD rows, position ids) + method.score.response_scores: "
            "hidden states, then LM head, log-softmax, top-k and label log-prob per chunk"
        ),
        views="conditional only (prompt + response), what on-policy distillation needs",
        top_k=p.top_k,
        chunk_positions=p.score_chunk,
        samples=len(samples),
        forwards=len(batches),
        tokens_counted="tokens read (prompt + response)",
    )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    kw = dict(top_k=p.top_k, bf16=b.bf16, chunk_tokens=p.score_chunk)
    response_scores(teacher, batches[0], **kw)  # warm-up
    tokens = resp = 0
    sync(dev)
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        if i and box.expired():
            break
        sc = response_scores(teacher, batch, **kw)
        sc.topk_ids.cpu(), sc.topk_logprobs.cpu()  # the targets go to storage
        tokens += batch.n_real_tokens
        resp += batch.n_loss_tokens
    sync(dev)
    s = time.perf_counter() - t0
    res.update(
        score_s=s,
        tokens=tokens,
        response_tokens=resp,
        tokens_per_s=tokens / s,
        response_tokens_per_s=resp / s,
    )
    if dev.type == "cuda":
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30


def section_onpolicy(b: Bench, box: TimeBox, res: dict[str, Any]) -> None:
    """One synchronous on-policy step as the ``onpolicy`` baseline takes it: the live student
    generates (fp32 weights under autocast), the teacher scores, one update on the padded batch.
    Out of memory halves the prompts and retries (as issue 17 asks of every stage)."""
    p, student = b.plan, b.student
    assert student is not None
    res.update(
        prompts=p.onpolicy_prompts,
        new_tokens=p.new_tokens,
        generate="npd_core.method.generate.generate with the training student (as the baseline)",
        teacher="npd_core.method.score.response_scores (chunked top-k) on the padded batch",
        update="npd_core.method.train.optimizer_step on the padded batch (one sample a row, sdpa)",
        steps_run=0,
    )
    student.set_attn_implementation("sdpa")
    n, step = p.onpolicy_prompts, 0
    while step < p.onpolicy_steps:
        if step and box.expired():
            break
        oom = False
        try:
            res.update(_onpolicy_step(b, n, step))
        except torch.OutOfMemoryError:
            oom = True  # handled once the failed step's tensors are released
        if oom:
            student.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if n == 1:
                raise RuntimeError("on-policy step out of memory at one prompt")
            n //= 2
            res.update(prompts=n, prompts_reduced=f"out of memory at {2 * n} prompts")
            continue
        step += 1
        res.update(steps_run=step, reported_step_warm=step > 1)


def _onpolicy_step(b: Bench, n: int, step: int) -> dict[str, Any]:
    """Generate → teacher top-k → update for ``n`` prompts; seconds of each part."""
    p, dev, student, teacher, opt = b.plan, b.dev, b.student, b.teacher, b.optimizer
    assert student is not None and teacher is not None and opt is not None
    prompts = random_prompts(n, p.prompt_len, p.student["vocab_size"], b.seed + 100 + step)
    sync(dev)
    t0 = time.perf_counter()
    gens = generate(
        student,
        prompts,
        n_per_prompt=1,
        max_new_tokens=p.new_tokens,
        eos_ids={-1},
        pad_id=0,
        temperature=1.0,
        top_p=1.0,
        seeds=[[b.seed + i] for i in range(n)],
        batch_size=n,
        bf16=b.bf16,
        halve_on_oom=False,  # the step's loop below halves the prompts and says so
    )
    samples = [Sample(pr, g[0].token_ids) for pr, g in zip(prompts, gens, strict=True)]
    sync(dev)
    t1 = time.perf_counter()
    offsets = response_offsets(samples)
    batch = collate(samples, [[i] for i in range(n)], 0, target_offsets=offsets)
    sc = response_scores(teacher, batch, top_k=p.top_k, bf16=b.bf16, chunk_tokens=p.score_chunk)
    ids, lps = sc.topk_ids, sc.topk_logprobs  # (M, k) each
    index = batch.target_index[batch.labels != IGNORE_INDEX].to(dev)  # (M,) flat positions
    table_ids, table_lp = torch.empty_like(ids), torch.empty_like(lps)
    table_ids[index], table_lp[index] = ids, lps
    targets = Targets(table_ids.cpu(), table_lp.cpu(), offsets)
    sync(dev)
    t2 = time.perf_counter()
    student.train()
    optimizer_step(student, opt, batch, targets, b.spec, lr=b.spec.lr, step=step, bf16=b.bf16)
    sync(dev)
    t3 = time.perf_counter()
    parts = {"generate_s": t1 - t0, "teacher_score_s": t2 - t1, "student_update_s": t3 - t2}
    total = sum(parts.values())
    return {
        **parts,
        "total_s": total,
        "fractions": {k.removesuffix("_s"): v / total for k, v in parts.items()},
        "generated_tokens": sum(len(s.response_ids) for s in samples),
        "train_tokens": batch.n_real_tokens,
    }


def section_projection(b: Bench, box: TimeBox, res: dict[str, Any]) -> None:
    """The per-sample cost split at the measured rates, then the cost model's speedup."""
    _per_sample_split(b, res)
    path = b.cost_bench
    if path is None or not path.is_file():
        res.update(available=False, why=f"no bench JSON for the sample efficiency ({path})")
        return
    bench = json.loads(path.read_text())
    work = cost.workload(bench)
    try:
        units = cost.device_units(b.report, {work["npd_rows"], work["sft_rows"]})
    except (KeyError, ZeroDivisionError) as e:
        res.update(available=False, why=f"a rate the cost model needs was not measured: {e}")
        return
    proj = cost.project(bench, units)
    res.update(
        available=proj["speedup"] is not None,
        bench=str(path),
        assumes=(
            "the bench's sample efficiency (seed 0: teacher tokens and steps to the target) and "
            "its batches; NPD's stages take turns on the one device (no overlap gain)"
        ),
        units=units,
        **proj,
    )


def _per_sample_split(b: Bench, res: dict[str, Any]) -> None:
    """One sample's seconds per stage at the measured rates and the on-policy batch."""
    p, rep = b.plan, b.report
    train = rep.get("train", {}).get("best_tokens_per_s")
    gen = rep.get("generate", {}).get("batches", {})
    score = rep.get("score", {}).get("tokens_per_s")
    B_on = str(min(p.gen_batches, key=lambda B: abs(B - p.onpolicy_prompts)))
    B_max = str(max(p.gen_batches))
    missing = [
        k
        for k, v in {
            "train": train,
            "score": score,
            f"generate batch {B_on}": gen.get(B_on, {}).get("tokens_per_s"),
        }.items()
        if not v
    ]
    if missing:
        res["per_sample"] = None
        res["per_sample_why"] = "not measured: " + ", ".join(missing)
        return
    prompt, resp = p.prompt_len, p.new_tokens
    split = {
        "student_decode_s": resp / gen[B_on]["tokens_per_s"],
        "teacher_score_s": (prompt + resp) / score,
        "train_s": (prompt + resp) / train,
    }
    total = sum(split.values())
    res["per_sample"] = {
        "sample": {"prompt_tokens": prompt, "response_tokens": resp},
        "decode_batch": int(B_on),
        **split,
        "total_s": total,
        "fractions": {k.removesuffix("_s"): v / total for k, v in split.items()},
        "rates": {
            "decode_tokens_per_s": gen[B_on]["tokens_per_s"],
            "score_tokens_per_s": score,
            "train_tokens_per_s": train,
            "train_attention": rep["train"].get("best"),
        },
    }
    if "tokens_per_s" in gen.get(B_max, {}):
        res["per_sample"][f"student_decode_s_at_batch{B_max}"] = resp / gen[B_max]["tokens_per_s"]


SECTION_FNS: dict[str, Callable[[Bench, TimeBox, dict[str, Any]], None]] = {
    "device": section_device,
    "train": section_train,
    "generate": section_generate,
    "score": section_score,
    "onpolicy_step": section_onpolicy,
    "projection": section_projection,
}


def write_json(report: dict[str, Any], out: Path | None) -> None:
    """Write ``report`` to ``out`` whole or not at all (temp file, then rename)."""
    if out is None:
        return
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(finite(report), indent=1, allow_nan=False, default=str))


def run_bench(
    *,
    tiny: bool = False,
    out: Path | None = None,
    boxes: dict[str, float] | None = None,
    peak_tflops: float | None = None,
    only: tuple[str, ...] = SECTIONS,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: None,
    cost_bench: Path | None = None,
) -> dict[str, Any]:
    """Run the sections in ``only`` (``device`` always: it builds the models) in order, each
    under its time box; return the report (also written to ``out`` after every section)."""
    plan = TINY_PLAN if tiny else GPU_PLAN
    dev = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    b = Bench(
        plan, dev, bf16=dev.type == "cuda", seed=seed, peak_tflops=peak_tflops, log=log,
        cost_bench=cost_bench,
    )  # fmt: skip
    register_varlen_attention()
    register_cuda_attention()
    box_s = {**plan.boxes, **(boxes or {})}
    t_run = time.perf_counter()
    b.report.update(
        bench="npd_core.bench.gpu",
        tiny=tiny,
        device_type=dev.type,
        minimum_versions={"torch": "2.11", "transformers": "5.17"},
        wall_s=0.0,
    )
    for name in [n for n in SECTIONS if n == "device" or n in only]:
        box = TimeBox(box_s[name])
        res: dict[str, Any] = {}
        b.report[name] = res
        t0 = time.perf_counter()
        try:
            with hard_limit(box_s[name] + max(HARD_GRACE_S, box_s[name] / 2)):
                SECTION_FNS[name](b, box, res)
        except Overrun as e:
            box.truncated = True
            res["cut"] = str(e)
        except Exception as e:  # noqa: BLE001 - the next sections still run and report
            res["error"] = f"{type(e).__name__}: {first_line(e)[:200]}"
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
        res.update(
            seconds=time.perf_counter() - t0, time_box_s=box_s[name], truncated=box.truncated
        )
        b.report["wall_s"] = time.perf_counter() - t_run
        write_json(b.report, out)
        log(f"{name}: {res['seconds']:.1f} s" + (" (truncated)" if box.truncated else ""))
    return b.report


def parse_boxes(items: list[str]) -> dict[str, float]:
    """``["train=5", ...]`` → ``{"train": 5.0}``; names must be sections."""
    boxes = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in SECTIONS or not value:
            raise SystemExit(f"--box {item!r}: use SECTION=SECONDS with SECTION in {SECTIONS}")
        boxes[name] = float(value)
    return boxes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m npd_core.bench.gpu", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the test's run)")
    ap.add_argument("--out", type=Path, help="write the JSON here after every section")
    ap.add_argument("--box", action="append", default=[], help="SECTION=SECONDS time box")
    ap.add_argument("--peak-tflops", type=float, help="override the peak used for MFU")
    ap.add_argument("--only", help="comma-separated sections to run (device always runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cost-bench",
        type=Path,
        default=default_cost_bench(),
        help="bench JSON whose sample efficiency the projection uses",
    )
    a = ap.parse_args(argv)
    report = run_bench(
        tiny=a.tiny,
        out=a.out,
        boxes=parse_boxes(a.box),
        peak_tflops=a.peak_tflops,
        only=tuple(a.only.split(",")) if a.only else SECTIONS,
        seed=a.seed,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        cost_bench=a.cost_bench,
    )
    if a.json:
        print(json.dumps(finite(report), allow_nan=False, default=str))
    errors = [n for n in SECTIONS if "error" in report.get(n, {})]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
