"""Unit costs measured on this device in a process of their own (``npd bench cost``): student
decoding tokens/s at batch 8…1024, the teacher's decoding, teacher scoring tokens/s packed and
padded, and training step seconds as a line ``c0 + tokens / rate``, all with the project's own
code at the bench's lengths, batches and thread counts (``workload``). The cost model
(``npd_core.bench.cost``) multiplies them by the counts read off the bench's curves; a bench
calibrates the same units inside its own runs (``cost.calibrate``) instead.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

BATCHES = (8, 32, 128, 512, 1024)  # student decoding batch sizes measured
SCORE_SAMPLES = 512  # samples scored for the packed teacher rate
TIMED_STEPS = 4  # training steps timed per batch size (after one warm-up step)


def decode_rate(rates: dict[str, float], batch: float) -> float:
    """Decoding tokens/s at ``batch``: linear in log(batch) between the measured sizes."""
    b = sorted((int(k), v) for k, v in rates.items())
    return float(np.interp(math.log(batch), [math.log(k) for k, _ in b], [v for _, v in b]))


def workload(bench: dict[str, Any]) -> dict[str, Any]:
    """What the units are measured at, from the bench JSON: the world's mean lengths, each
    method's searched batch, the stages' thread counts and the probe's overlap gain."""
    cfg, grid, table = bench["config"], bench["grid"], bench["variants"]
    chosen = grid["chosen"]
    npd_settings = table["npd"]["settings"][0]
    threads = npd_settings["threads"]
    cal = bench["calibration"].get(str(chosen["npd"]["rows_per_step"]), {}).get(str(threads), {})
    sft = table.get("sft")
    teacher_resp = (
        sft["seed_totals"][0]["generated_tokens"] / bench["train_prompts"]
        if sft
        else grid["base_lengths"]["response_tokens"]
    )
    staleness = cfg["staleness"] > 0 and cfg.get("overlap", True)
    return {
        "prompt_tokens": grid["base_lengths"]["prompt_tokens"],
        "response_tokens": grid["base_lengths"]["response_tokens"],
        "teacher_response_tokens": teacher_resp,
        "gen_batch": cfg["generate"]["batch_size"],
        "n_per_prompt": cfg["generate"]["n_per_prompt"],
        "onpolicy_prompts": chosen["onpolicy"]["prompts_per_step"],
        "npd_rows": chosen["npd"]["rows_per_step"],
        "sft_rows": chosen.get("sft", chosen["npd"])["rows_per_step"],
        "row_tokens": cfg["pack"]["max_seq_len"],
        "top_k": cfg["score"]["top_k"],
        "score_batch_tokens": cfg["score"]["batch_tokens"],
        # the baselines run one stage at a time on every core, unless the config pins threads
        "threads": {"npd": threads, "baselines": cfg.get("threads") or os.cpu_count() or 1},
        "overlap_gain": cal.get("overlap_gain") if staleness else None,
    }


def measure_units(
    bench: dict[str, Any], log: Callable[[str], None] = lambda m: None
) -> dict[str, Any]:
    """Unit costs at ``workload(bench)`` on this device, by thread count, with the bench's
    teacher and θ_0 on its training prompts: decoding runs to the real EOS at the run's
    temperature (so a batch pays for its longest answer, as the stages do), and θ_0's own
    answers are what the teacher scores and the learner steps on."""
    import torch

    from npd_core.config import NPDConfig
    from npd_core.data import read_prompts
    from npd_core.method.optim import make_optimizer
    from npd_core.models import format_prompts, frozen_dtype, load_model, load_tokenizer
    from npd_core.pipeline.kernels import choose_attention
    from npd_core.pipeline.spec import RunSpec

    work = workload(bench)
    cfg = NPDConfig.model_validate(bench["config"])
    paths = bench["paths"]
    spec = choose_attention(
        RunSpec(bench["out"], "cost", bench["config"], paths["teacher"], paths["student"],
                paths["train_prompts"], paths["eval_prompts"]),
        log=log,
    )  # fmt: skip
    tok = load_tokenizer(paths["student"])
    texts = [p.prompt for p in read_prompts(paths["train_prompts"])]
    prompts = format_prompts(tok, texts, cfg.data.chat_template)
    prompts = (prompts * math.ceil(max(BATCHES) / len(prompts)))[: max(BATCHES)]
    frozen = frozen_dtype(cfg.models.frozen_dtype)
    student, teacher = load_model(paths["student"], frozen), load_model(paths["teacher"], frozen)
    out: dict[str, Any] = {"workload": work, "attention": spec.attention}
    for threads in sorted({work["threads"]["npd"], work["threads"]["baselines"]}):
        torch.set_num_threads(threads)
        u: dict[str, Any] = {"decode": {}}
        for b in BATCHES:
            u["decode"][str(b)], pool = _decode_rate(student, prompts[:b], cfg, tok, greedy=False)
            log(f"cost: {threads} threads, decode batch {b}: {u['decode'][str(b)]:.0f} tok/s")
        u["teacher_decode_tokens_per_s"], _ = _decode_rate(
            teacher, prompts[: work["gen_batch"]], cfg, tok, greedy=True
        )
        u["score_packed_tokens_per_s"] = _packed_score_rate(
            teacher, pool[:SCORE_SAMPLES], work, spec.kernel("score_teacher"), cfg
        )
        u["score_padded_tokens_per_s"] = _padded_score_rate(teacher, pool, work, cfg)
        learner = load_model(paths["student"])  # fp32 master weights, as the learners'
        opt = make_optimizer(learner, cfg.train)
        u["train_packed"] = {
            str(r): _step_line(learner, opt, cfg, pool, work, rows=r, kernel=spec.kernel("train"))
            for r in sorted({work["npd_rows"], work["sft_rows"]})
        }
        u["train_padded"] = _step_line(learner, opt, cfg, pool, work, rows=None, kernel="sdpa")
        out[str(threads)] = u
    return out


def _decode_rate(
    model: Any, prompts: list[list[int]], cfg: Any, tok: Any, greedy: bool
) -> tuple[float, list[Any]]:
    """Generated tokens/s of one batch of ``prompts`` (after a short warm-up), and its samples."""
    from npd_core.method.generate import generate
    from npd_core.method.packing import Sample
    from npd_core.models import use_bf16

    g = cfg.generate
    kw = dict(
        n_per_prompt=1, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
        temperature=0.0 if greedy else g.temperature, top_p=g.top_p,
        seeds=None if greedy else [[i] for i in range(len(prompts))],
        batch_size=len(prompts), bf16=use_bf16(cfg.models.bf16),
        halve_on_oom=False,  # the rate of this batch size or none
    )  # fmt: skip
    generate(model, prompts, max_new_tokens=2, **kw)  # warm-up at this batch's shapes
    t0 = time.perf_counter()
    gens = generate(model, prompts, max_new_tokens=g.max_new_tokens, **kw)
    seconds = time.perf_counter() - t0
    samples = [Sample(p, x[0].token_ids) for p, x in zip(prompts, gens, strict=True)]
    return sum(len(s.response_ids) for s in samples) / seconds, samples


def _packed_score_rate(
    teacher: Any, samples: list[Any], work: dict[str, Any], kernel: str | None, cfg: Any
) -> float:
    """Teacher tokens/s of NPD's score stage (``method.score``, conditional view, top-k)."""
    from npd_core.method.attention import packed_attention
    from npd_core.method.score import score
    from npd_core.models import use_bf16

    prompts, resps = [s.prompt_ids for s in samples], [s.response_ids for s in samples]
    kw = dict(view=None, top_k=work["top_k"], batch_tokens=work["score_batch_tokens"],
              bf16=use_bf16(cfg.models.bf16))  # fmt: skip
    with packed_attention(teacher, kernel):
        score(teacher, prompts[:8], resps[:8], **kw)  # warm-up
        t0 = time.perf_counter()
        score(teacher, prompts, resps, **kw)
        seconds = time.perf_counter() - t0
    return (sum(map(len, prompts)) + sum(map(len, resps))) / seconds


def _padded_score_rate(teacher: Any, pool: list[Any], work: dict[str, Any], cfg: Any) -> float:
    """Teacher tokens/s of on-policy's per-step forward (``teacher_topk``): its batch of θ_0's
    samples, one a padded row."""
    from npd_core.baselines.onpolicy import teacher_topk
    from npd_core.models import use_bf16

    bf16 = use_bf16(cfg.models.bf16)
    n = work["onpolicy_prompts"] * work["n_per_prompt"]
    tokens = seconds = 0.0
    for j in range(TIMED_STEPS + 1):
        batch, offsets = _padded(pool, n, j)
        t0 = time.perf_counter()
        teacher_topk(teacher, batch, offsets, work["top_k"], bf16)
        if j:  # the first is a warm-up
            seconds += time.perf_counter() - t0
            tokens += batch.n_real_tokens
    return tokens / seconds


def _padded(pool: list[Any], n: int, j: int) -> tuple[Any, list[int]]:
    """The ``j``-th on-policy batch of ``n`` samples from ``pool``, one sample a padded row."""
    from npd_core.method.packing import collate, response_offsets

    samples = [pool[(j * n + i) % len(pool)] for i in range(n)]
    offsets = response_offsets(samples)
    return collate(samples, [[i] for i in range(n)], 0, target_offsets=offsets), offsets


def _step_line(
    model: Any, opt: Any, cfg: Any, pool: list[Any], work: dict[str, Any], rows: int | None,
    kernel: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Seconds per training step as ``c0 + tokens / rate``, fitted to steps at the variant's
    batch and at a quarter of it: ``rows`` packed rows of ``row_tokens`` (BFD, as the pack
    stage), or (None) on-policy's padded batch. Random top-k targets: a step's cost does not
    depend on their values."""
    import torch

    from npd_core.method.attention import packed_attention
    from npd_core.method.train import Targets, optimizer_step
    from npd_core.models import use_bf16

    full = rows or work["onpolicy_prompts"] * work["n_per_prompt"]
    g = torch.Generator().manual_seed(0)
    points = []
    for size in sorted({max(1, full // 4), full}):
        times, tokens = [], []
        for j in range(TIMED_STEPS + 1):
            if rows is None:
                batch, offsets = _padded(pool, size, j)
            else:
                batch, offsets = _packed_rows(pool, size, work["row_tokens"], j)
            m = int(batch.target_index.max()) + 1  # the table rows the batch reads
            tgt = Targets(
                torch.randint(0, model.config.vocab_size, (m, work["top_k"]), generator=g),
                torch.log_softmax(torch.randn(m, work["top_k"], generator=g), -1),
                offsets,
            )
            model.train()
            with packed_attention(model, kernel):
                t0 = time.perf_counter()
                optimizer_step(model, opt, batch, tgt, cfg.train, lr=1e-6, step=j,
                               bf16=use_bf16(cfg.models.bf16), padded=rows is None)  # fmt: skip
                if j:
                    times.append(time.perf_counter() - t0)
                    tokens.append(batch.n_real_tokens)
        points.append((float(np.mean(tokens)), float(np.median(times))))
    (t1, s1), (t2, s2) = points[0], points[-1]
    if t2 > t1 and s2 > s1:
        rate = (t2 - t1) / (s2 - s1)
        c0 = max(0.0, s2 - t2 / rate)
    else:  # one size only, or noise: all of it per token
        rate, c0 = t2 / s2, 0.0
    return {"c0_s": c0, "tokens_per_s": rate, "points": points}


def _packed_rows(pool: list[Any], rows: int, row_tokens: int, j: int) -> tuple[Any, list[int]]:
    """``rows`` BFD-packed rows of ``row_tokens`` from ``pool`` (the ``j``-th draw)."""
    from npd_core.method.packing import collate, pack, response_offsets

    mean = float(np.mean([len(s) for s in pool]))
    n = min(len(pool), math.ceil(1.2 * rows * row_tokens / mean))
    samples = [pool[(j * n + i) % len(pool)] for i in range(n)]
    samples = [s for s in samples if len(s) <= row_tokens]
    offsets = response_offsets(samples)
    lay = pack([len(s) for s in samples], row_tokens, "bfd", j)
    lay.sort(key=lambda r: -sum(len(samples[i]) for i in r))  # the fullest rows
    return collate(samples, lay[:rows], 0, row_len=row_tokens, target_offsets=offsets), offsets
