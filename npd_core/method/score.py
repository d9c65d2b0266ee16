"""Scoring: per-token log-probs of responses under a model, with and without their prompt.

One packed forward covers both views of every sample: ``prompt + response`` (conditional) and
``start + response`` (response-only, the start token being BOS or EOS, see ``ifd``). Packing
the scoring batch too means no compute is spent on padding; the block-diagonal mask keeps every
sample independent, so a sample's scores do not depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from npd_core.method.packing import IGNORE_INDEX, Sample, best_fit_decreasing, collate
from npd_core.models import autocast


@dataclass
class Scores:
    """Per-sample log-likelihood sums and, when asked, top-k targets per response position."""

    cond_logprob_sum: np.ndarray  # (N,) Σ log p(y_t | x, y_<t)
    resp_logprob_sum: np.ndarray  # (N,) Σ log p(y_t | start, y_<t)
    topk_ids: list[np.ndarray] | None  # N arrays (r_i, k) int32, conditional view
    topk_logprobs: list[np.ndarray] | None  # N arrays (r_i, k) float32


@torch.no_grad()
def score(
    model: PreTrainedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    start_id: int,
    top_k: int | None,
    batch_tokens: int,
    bf16: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Scores:
    """Score ``responses[i]`` after ``prompts[i]`` and after the start token alone."""
    model.eval()
    dev = next(model.parameters()).device
    n = len(prompts)
    samples = [Sample(p, r) for p, r in zip(prompts, responses, strict=True)]
    samples += [Sample([start_id], r) for r in responses]
    resp_len = np.array([len(s.response_ids) for s in samples])
    offsets = np.concatenate([[0], np.cumsum(resp_len)])
    total = int(offsets[-1])
    row_len = max(len(s) for s in samples)
    rows = best_fit_decreasing([len(s) for s in samples], row_len)
    rows_per_fwd = max(1, batch_tokens // row_len)
    k = min(top_k or 1, model.config.vocab_size)
    tok_lp = torch.zeros(total)
    tk_ids = torch.zeros((total, k), dtype=torch.int32) if top_k else None
    tk_lp = torch.zeros((total, k)) if top_k else None
    for s in range(0, len(rows), rows_per_fwd):
        chunk = rows[s : s + rows_per_fwd]
        b = collate(samples, chunk, pad_id=0, row_len=row_len, target_offsets=offsets[:-1].tolist())
        with autocast(bf16):
            logits = model(
                input_ids=b.input_ids.to(dev), position_ids=b.position_ids.to(dev), use_cache=False
            ).logits  # (B, T, V)
        at = b.labels != IGNORE_INDEX  # (B, T)
        logp = torch.log_softmax(logits[at.to(dev)].float(), -1).cpu()  # (M, V)
        idx = b.target_index[at]  # (M,) flat response positions
        tok_lp[idx] = logp.gather(-1, b.labels[at][:, None]).squeeze(-1)
        if top_k:
            v, i = logp.topk(k, dim=-1)
            tk_lp[idx], tk_ids[idx] = v, i.to(torch.int32)
        if progress:
            progress(sum(len(row) for row in chunk))  # sequences scored (2 per sample)
    sums = torch.zeros(2 * n, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(2 * n), torch.as_tensor(resp_len)), tok_lp.double()
    )
    topk_ids = topk_lp = None
    if top_k:
        topk_ids = [tk_ids[offsets[i] : offsets[i + 1]].numpy() for i in range(n)]
        topk_lp = [tk_lp[offsets[i] : offsets[i + 1]].numpy() for i in range(n)]
    return Scores(sums[:n].numpy(), sums[n:].numpy(), topk_ids, topk_lp)
