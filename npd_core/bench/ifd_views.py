"""Which prompt-less view makes Δ-IFD track what the student still has to learn.

IFD compares a response's likelihood after its prompt with its likelihood after a *view* that
stands in for "no prompt" (``filter.view``). For each candidate view this measures Spearman's ρ
between a sample's Δ-IFD and its per-token forward KL(teacher top-k ‖ student), the quantity the
learner minimises, on fresh samples of a run's checkpoints θ_k (the run's own prompts, sampling
settings and teacher). The candidate with the highest mean ρ over the checkpoints is the one
``filter.view`` should default to; every candidate's ρ is reported.

``npd bench ifd-views --out DIR --run RUN_ID [--checkpoints 3,6] [--text "…"] --json``
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from npd_core.data import read_prompts, round_prompts
from npd_core.method.generate import generate
from npd_core.method.ifd import delta_ifd, log_ifd
from npd_core.method.score import TopK, score
from npd_core.models import format_prompts, load_model, load_tokenizer, use_bf16, view_prefix
from npd_core.pipeline.spec import RunSpec
from npd_core.seeds import seed_for

GENERIC_INSTRUCTION = "Answer the question."
# name → (filter.view, filter.view_text)
CANDIDATES: dict[str, tuple[str, str]] = {
    "bos": ("bos", ""),
    "eos": ("eos", ""),
    "empty_turn": ("prompt", ""),
    "generic_instruction": ("prompt", GENERIC_INSTRUCTION),
}
ROUND_BASE = 1_000_000  # prompt draws of this bench never coincide with a run's rounds


def _rho(x: np.ndarray, y: np.ndarray) -> float | None:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return None
    return float(spearmanr(x[ok], y[ok]).statistic)


def run_views(
    root: str,
    run_id: str,
    checkpoints: Sequence[int] = (3, 6),
    n: int = 2048,
    texts: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """ρ(Δ-IFD, per-token forward KL) per candidate view and checkpoint; ``texts`` adds
    ``view: prompt`` candidates with those texts."""
    spec = RunSpec.load(root, run_id)
    cfg = spec.cfg
    torch.set_num_threads(cfg.stage_threads(concurrent=False))
    cands = dict(CANDIDATES) | {f"text:{t}": ("prompt", t) for t in texts}
    teacher = load_model(spec.teacher)
    tok = load_tokenizer(spec.teacher)
    views = {name: view_prefix(tok, v, t, cfg.data.chat_template) for name, (v, t) in cands.items()}
    kw = dict(batch_tokens=cfg.score.batch_tokens, bf16=use_bf16(cfg.models.bf16))
    g = cfg.generate
    out: dict[str, Any] = {"run_id": run_id, "root": str(root), "n": n, "checkpoints": {}}
    for k in checkpoints:
        prompts = round_prompts(read_prompts(spec.train_prompts), n, cfg.seed, ROUND_BASE + k)
        ids = format_prompts(tok, [p.prompt for p in prompts], cfg.data.chat_template)
        student = load_model(spec.checkpoint(k))
        log(f"θ_{k}: sampling {len(ids)} responses")
        gens = generate(
            student, ids, n_per_prompt=1, max_new_tokens=g.max_new_tokens,
            eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id or 0,
            temperature=g.temperature, top_p=g.top_p,
            seeds=[[seed_for(cfg.seed, "ifd-views", k, p.id, 0)] for p in prompts],
            batch_size=g.batch_size, bf16=use_bf16(cfg.models.bf16),
        )  # fmt: skip
        resps = [row[0].token_ids for row in gens]
        lens = np.array([len(r) for r in resps], dtype=np.float64)
        keep = lens > 0
        ids = [x for x, ok in zip(ids, keep, strict=True) if ok]
        resps = [x for x, ok in zip(resps, keep, strict=True) if ok]
        lens = lens[keep]
        t = score(teacher, ids, resps, view=None, top_k=cfg.score.top_k, **kw)
        s = score(
            student,
            ids,
            resps,
            view=None,
            top_k=None,
            targets=TopK(t.topk_ids, t.topk_logprobs),
            **kw,
        )
        kl = s.forward_kl_sum / lens
        row: dict[str, Any] = {"samples": len(resps), "mean_kl_per_token": float(kl.mean())}
        for name, view in views.items():
            tv = score(teacher, ids, resps, view=view, top_k=None, **kw)
            sv = score(student, ids, resps, view=view, top_k=None, **kw)
            d = delta_ifd(
                log_ifd(t.cond_logprob_sum, tv.resp_logprob_sum, lens),
                log_ifd(s.cond_logprob_sum, sv.resp_logprob_sum, lens),
            )
            row[name] = {"view_tokens": view, "spearman": _rho(d, kl)}
            log(f"θ_{k} {name:<24} ρ = {row[name]['spearman']}")
        out["checkpoints"][str(k)] = row
    means = {
        name: float(np.mean([out["checkpoints"][str(k)][name]["spearman"] for k in checkpoints]))
        for name in views
    }
    out["mean_spearman"] = means
    out["best"] = max(means, key=lambda x: means[x])
    return out
