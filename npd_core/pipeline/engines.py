"""The engines a stage runs on: the HF model in this process or vLLM
(``npd_core.backends.vllm``), for sampling (generate) and teacher/student forwards (score),
with vLLM's start and snapshot-load seconds as stage metrics. One place that tells the two
apart, so the stages read the same for both."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from npd_core.backends import vllm as vllm_backend
from npd_core.config import NPDConfig
from npd_core.method.attention import packed_attention
from npd_core.method.batching import memory_budget
from npd_core.method.generate import Generation, generate
from npd_core.method.score import Scores, TopK, score
from npd_core.models import frozen_dtype, load_model, load_tokenizer, use_bf16, view_prefix

Progress = Callable[[int], None] | None


def engine_times(times: vllm_backend.EngineTimes, prefix: str = "") -> dict[str, float]:
    """How long vLLM took to start, or to load the round's snapshot, as stage metrics."""
    return {f"{prefix}engine_start_s": times.start_s, f"{prefix}engine_refresh_s": times.refresh_s}


def generate_with(
    backend: str,
    ckpt: str,
    tok: Any,
    ids: list[list[int]],
    seeds: list[list[int]],
    cfg: NPDConfig,
    progress: Progress,
) -> tuple[list[list[Generation]], dict[str, float]]:
    """Sample with the HF or the vLLM engine: the generations and vLLM's engine timings."""
    g = cfg.generate
    sampling = dict(
        n_per_prompt=g.n_per_prompt,
        max_new_tokens=g.max_new_tokens,
        eos_ids={tok.eos_token_id},
        temperature=g.temperature,
        top_p=g.top_p,
        seeds=seeds,
        progress=progress,
    )
    if backend == "vllm":
        opts = vllm_backend.EngineOptions.of(cfg)
        gens, times = vllm_backend.generate(ckpt, ids, options=opts, **sampling)
        return gens, engine_times(times)
    model = load_model(ckpt, frozen_dtype(cfg.models.frozen_dtype))
    gens = generate(
        model,
        ids,
        pad_id=tok.pad_token_id,
        batch_size=g.batch_size,
        bf16=use_bf16(cfg.models.bf16),
        memory=memory_budget(g.memory_gb, model.device),
        **sampling,
    )
    return gens, {}


def score_with(
    backend: str,
    model_dir: str,
    role: str,
    prompts: list[list[int]],
    resps: list[list[int]],
    top_k: int | None,
    cfg: NPDConfig,
    progress: Progress,
    targets: TopK | None = None,
    kernel: str | None = None,
) -> tuple[Scores, dict[str, float]]:
    """Score with the HF or the vLLM engine: the scores and vLLM's engine timings. The
    prompt-less view only when the filter needs it; the KL to ``targets`` and the packed
    attention ``kernel`` (the run's recorded choice; None = the model's own) with HF only."""
    f = cfg.filter
    view = None
    if f.needs_views:
        view = view_prefix(load_tokenizer(model_dir), f.view, f.view_text, cfg.data.chat_template)
    if backend == "vllm":
        opts = vllm_backend.EngineOptions.of(cfg)
        res, times = vllm_backend.score(
            model_dir, role, prompts, resps, view=view, top_k=top_k, options=opts, progress=progress
        )
        return res, engine_times(times, f"{role}_")
    model = load_model(model_dir, frozen_dtype(cfg.models.frozen_dtype))
    with packed_attention(model, kernel):
        res = score(
            model,
            prompts,
            resps,
            view=view,
            top_k=top_k,
            batch_tokens=cfg.score.batch_tokens,
            bf16=use_bf16(cfg.models.bf16),
            targets=targets,
            memory=memory_budget(cfg.score.memory_gb, model.device),
            stage=f"score ({role})",
            progress=progress,
        )
    return res, {}
