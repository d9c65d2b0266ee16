"""Scoring: per-token log-probs of responses under a model, with and, when asked, without their
prompt.

The conditional view (``prompt + response``) is always scored; the prompt-less view (``view +
response``, ``view`` being the tokens ``models.view_prefix`` picks) only when Δ-IFD needs it.
Each view is packed into rows of its own (block-diagonal mask, so no compute is spent on padding
and a sample's scores do not depend on its neighbours), and the conditional rows are the same
whether the other view is scored or not, so skipping it changes no conditional number. Top-k is
taken at conditional response positions only: the only place the learner reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from npd_core.method.losses import forward_kl_topk
from npd_core.method.packing import IGNORE_INDEX, Sample, best_fit_decreasing, collate
from npd_core.models import autocast


@dataclass
class Scores:
    """Per-sample log-likelihood sums and, when asked, top-k targets per response position."""

    cond_logprob_sum: np.ndarray  # (N,) Σ log p(y_t | x, y_<t)
    resp_logprob_sum: np.ndarray | None  # (N,) Σ log p(y_t | view, y_<t); None: view not scored
    topk_ids: list[np.ndarray] | None  # N arrays (r_i, k) int32, conditional view
    topk_logprobs: list[np.ndarray] | None  # N arrays (r_i, k) float32
    forward_kl_sum: np.ndarray | None = None  # (N,) Σ_t KL(teacher top-k ‖ this model)


@dataclass
class TopK:
    """The teacher's top-k per conditional response position, to measure KL(teacher ‖ model)."""

    ids: list[np.ndarray]  # N arrays (r_i, k)
    logprobs: list[np.ndarray]  # N arrays (r_i, k)


def _view_logprobs(
    model: PreTrainedModel,
    samples: list[Sample],
    *,
    batch_tokens: int,
    bf16: bool,
    progress: Callable[[int], None] | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Packed forwards over ``samples``: per chunk, the flat response positions (M,), the
    target tokens (M,) and the log-probs there (M, V), float32 on the CPU."""
    dev = next(model.parameters()).device
    resp_len = [len(s.response_ids) for s in samples]
    offsets = np.concatenate([[0], np.cumsum(resp_len)])[:-1].tolist()
    row_len = max(len(s) for s in samples)
    rows = best_fit_decreasing([len(s) for s in samples], row_len)
    rows_per_fwd = max(1, batch_tokens // row_len)
    for s in range(0, len(rows), rows_per_fwd):
        chunk = rows[s : s + rows_per_fwd]
        b = collate(samples, chunk, pad_id=0, row_len=row_len, target_offsets=offsets)
        with autocast(bf16):
            logits = model(
                input_ids=b.input_ids.to(dev), position_ids=b.position_ids.to(dev), use_cache=False
            ).logits  # (B, T, V)
        at = b.labels != IGNORE_INDEX  # (B, T)
        logp = torch.log_softmax(logits[at.to(dev)].float(), -1).cpu()  # (M, V)
        yield b.target_index[at], b.labels[at], logp
        if progress:
            progress(sum(len(row) for row in chunk))  # sequences scored


def _per_sample(values: torch.Tensor, resp_len: list[int]) -> np.ndarray:
    """Σ over each sample's response positions of a flat (Σ r_i,) tensor → (N,) float64."""
    seg = torch.repeat_interleave(torch.arange(len(resp_len)), torch.as_tensor(resp_len))
    return torch.zeros(len(resp_len), dtype=torch.float64).index_add_(0, seg, values.double())


@torch.no_grad()
def score(
    model: PreTrainedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    view: list[int] | None,
    top_k: int | None,
    batch_tokens: int,
    bf16: bool = True,
    targets: TopK | None = None,
    progress: Callable[[int], None] | None = None,
) -> Scores:
    """Score ``responses[i]`` after ``prompts[i]`` and, unless ``view`` is None, after ``view``;
    with ``targets``, also this model's forward KL from them per sample."""
    model.eval()
    resp_len = [len(r) for r in responses]
    total = sum(resp_len)
    k = min(top_k or 1, model.config.vocab_size)
    tok_lp = torch.zeros(total)
    tk_ids = torch.zeros((total, k), dtype=torch.int32) if top_k else None
    tk_lp = torch.zeros((total, k)) if top_k else None
    kl = torch.zeros(total) if targets else None
    if targets:
        t_ids = torch.as_tensor(np.concatenate(targets.ids), dtype=torch.long)
        t_lp = torch.as_tensor(np.concatenate(targets.logprobs), dtype=torch.float32)
    kw = dict(batch_tokens=batch_tokens, bf16=bf16, progress=progress)
    cond = [Sample(p, r) for p, r in zip(prompts, responses, strict=True)]
    for idx, labels, logp in _view_logprobs(model, cond, **kw):
        tok_lp[idx] = logp.gather(-1, labels[:, None]).squeeze(-1)
        if top_k:
            v, i = logp.topk(k, dim=-1)
            tk_lp[idx], tk_ids[idx] = v, i.to(torch.int32)
        if targets:
            kl[idx] = forward_kl_topk(logp, t_ids[idx], t_lp[idx])
    resp_sum = None
    if view is not None:
        view_lp = torch.zeros(total)
        for idx, labels, logp in _view_logprobs(model, [Sample(view, r) for r in responses], **kw):
            view_lp[idx] = logp.gather(-1, labels[:, None]).squeeze(-1)
        resp_sum = _per_sample(view_lp, resp_len).numpy()
    topk_ids = topk_lp = None
    if top_k:
        bounds = np.concatenate([[0], np.cumsum(resp_len)])
        topk_ids = [tk_ids[bounds[i] : bounds[i + 1]].numpy() for i in range(len(responses))]
        topk_lp = [tk_lp[bounds[i] : bounds[i + 1]].numpy() for i in range(len(responses))]
    return Scores(
        _per_sample(tok_lp, resp_len).numpy(),
        resp_sum,
        topk_ids,
        topk_lp,
        _per_sample(kl, resp_len).numpy() if targets else None,
    )
