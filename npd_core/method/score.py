"""Scoring: per-token log-probs of responses under a model, with and, when asked, without their
prompt.

The conditional view (``prompt + response``) is always scored; the prompt-less view (``view +
response``, ``view`` being the tokens ``models.view_prefix`` picks) only when Δ-IFD needs it.
Each view is packed into rows of its own (block-diagonal mask, so no compute is spent on padding
and a sample's scores do not depend on its neighbours), and the conditional rows are the same
whether the other view is scored or not, so skipping it changes no conditional number. Top-k is
taken at conditional response positions only: the only place the learner reads it.
Each forward runs to the last hidden state, and the LM head turns ``CHUNK_TOKENS`` response
positions at a time into log-probs (``method.head``), so no tokens × vocabulary logits exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from npd_core.method.batching import (
    activation_bytes,
    forward_bytes_per_token,
    halving,
    rows_that_fit,
)
from npd_core.method.head import chunks, head_inputs
from npd_core.method.losses import forward_kl_topk
from npd_core.method.packing import (
    IGNORE_INDEX,
    PackedBatch,
    Sample,
    best_fit_decreasing,
    collate,
)
from npd_core.method.train import model_inputs

CHUNK_TOKENS = 1024  # response positions whose logits exist at once (as train.loss_chunk_tokens)


@dataclass
class Scores:
    """Per-sample log-likelihood sums and, when asked, top-k targets per response position."""

    cond_logprob_sum: np.ndarray  # (N,) Σ log p(y_t | x, y_<t)
    resp_logprob_sum: np.ndarray | None  # (N,) Σ log p(y_t | view, y_<t); None: view not scored
    topk_ids: list[np.ndarray] | None  # N arrays (r_i, k) int32, conditional view
    topk_logprobs: list[np.ndarray] | None  # N arrays (r_i, k) float32
    forward_kl_sum: np.ndarray | None = None  # (N,) Σ_t KL(teacher top-k ‖ this model)
    token_logprobs: list[np.ndarray] | None = None  # N arrays (r_i,) float32, log p(y_t | x, y_<t)


@dataclass
class TopK:
    """The teacher's top-k per conditional response position, to measure KL(teacher ‖ model)."""

    ids: list[np.ndarray]  # N arrays (r_i, k)
    logprobs: list[np.ndarray]  # N arrays (r_i, k)


@dataclass
class PositionScores:
    """Scores at every response position of one packed batch (``labels != IGNORE_INDEX``, in
    row-major order), on the model's device."""

    token_logprob: torch.Tensor  # (M,) log p(label)
    topk_ids: torch.Tensor | None  # (M, k) int64, best first; None: top_k 0
    topk_logprobs: torch.Tensor | None  # (M, k) float32
    forward_kl: torch.Tensor | None  # (M,) KL(targets' top-k ‖ model); None: no targets


@torch.no_grad()
def response_scores(
    model: PreTrainedModel,
    batch: PackedBatch,
    *,
    top_k: int,
    bf16: bool,
    chunk_tokens: int = CHUNK_TOKENS,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PositionScores:
    """One forward of ``batch`` to the last hidden state, then, ``chunk_tokens`` response
    positions at a time, the LM head, log-softmax over the vocabulary, the label's log-prob,
    the top-``top_k`` (0: none) and, with ``targets`` (ids, log-probs) of shape (M, k), this
    model's forward KL from them; so at most chunk × V logits exist (``method.head``)."""
    dev = next(model.parameters()).device
    at = (batch.labels != IGNORE_INDEX).to(dev)  # (B, T)
    labels = batch.labels.to(dev)[at]  # (M,)
    hidden, head = head_inputs(model, model_inputs(batch, dev), bf16)
    hidden = hidden[at]  # (M, H)
    k = min(top_k, model.config.vocab_size)
    tok, ids, lps, kl = [], [], [], []
    for s in chunks(len(labels), chunk_tokens):
        logp = torch.log_softmax(head(hidden[s]).float(), -1)  # (c, V)
        tok.append(logp.gather(-1, labels[s, None]).squeeze(-1))
        if k:
            v, i = logp.topk(k, dim=-1)  # (c, k)
            ids.append(i)
            lps.append(v)
        if targets is not None:
            kl.append(forward_kl_topk(logp, targets[0][s].to(dev), targets[1][s].to(dev)))
    return PositionScores(
        torch.cat(tok),
        torch.cat(ids) if k else None,
        torch.cat(lps) if k else None,
        torch.cat(kl) if targets is not None else None,
    )


def _views(
    model: PreTrainedModel,
    samples: list[Sample],
    *,
    batch_tokens: int,
    bf16: bool,
    progress: Callable[[int], None] | None,
    memory: int | None = None,
    stage: str = "score",
    top_k: int = 0,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, PositionScores]]:
    """Packed forwards over ``samples``: per forward, the flat response positions (M,) and
    their :func:`response_scores` (``targets``: the flat table, indexed by those positions).
    A forward takes ``batch_tokens`` worth of rows, fewer where the ``memory`` budget (bytes)
    holds fewer, and half as many after an out-of-memory error (``method.batching``)."""
    resp_len = [len(s.response_ids) for s in samples]
    offsets = np.concatenate([[0], np.cumsum(resp_len)])[:-1].tolist()
    row_len = max(len(s) for s in samples)
    rows = best_fit_decreasing([len(s) for s in samples], row_len)
    rows_per_fwd = max(1, batch_tokens // row_len)

    def row_bytes(_: int) -> int:  # asked only with a budget, or after an out-of-memory error
        return row_len * forward_bytes_per_token(
            model.config, activation_bytes(model, bf16), row_len
        )

    def fit(start: int, cap: int) -> int:
        return rows_that_fit(memory, min(cap, rows_per_fwd), row_bytes)

    def run(start: int, end: int) -> tuple[torch.Tensor, PositionScores]:
        b = collate(samples, rows[start:end], pad_id=0, row_len=row_len, target_offsets=offsets)
        idx = b.target_index[b.labels != IGNORE_INDEX]  # (M,)
        at_idx = None if targets is None else (targets[0][idx], targets[1][idx])
        return idx, response_scores(model, b, top_k=top_k, bf16=bf16, targets=at_idx)

    for start, end, (idx, scores) in halving(
        stage, len(rows), fit, run, row_bytes, unit="packed row"
    ):
        yield idx, scores
        if progress:
            progress(sum(len(row) for row in rows[start:end]))  # sequences scored


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
    memory: int | None = None,
    stage: str = "score",
    progress: Callable[[int], None] | None = None,
) -> Scores:
    """Score ``responses[i]`` after ``prompts[i]`` and, unless ``view`` is None, after ``view``;
    with ``targets``, also this model's forward KL from them per sample. A forward packs
    ``batch_tokens`` tokens at most, fewer where a ``memory`` budget (bytes) holds fewer."""
    model.eval()
    resp_len = [len(r) for r in responses]
    total = sum(resp_len)
    k = min(top_k or 1, model.config.vocab_size)
    tok_lp = torch.zeros(total)
    tk_ids = torch.zeros((total, k), dtype=torch.int32) if top_k else None
    tk_lp = torch.zeros((total, k)) if top_k else None
    kl = torch.zeros(total) if targets else None
    kw = dict(batch_tokens=batch_tokens, bf16=bf16, progress=progress, memory=memory, stage=stage)
    cond = [Sample(p, r) for p, r in zip(prompts, responses, strict=True)]
    t_table = None
    if targets:
        t_table = (
            torch.as_tensor(np.concatenate(targets.ids), dtype=torch.long),
            torch.as_tensor(np.concatenate(targets.logprobs), dtype=torch.float32),
        )
    for idx, sc in _views(model, cond, top_k=top_k or 0, targets=t_table, **kw):
        tok_lp[idx] = sc.token_logprob.cpu()
        if top_k:
            tk_lp[idx], tk_ids[idx] = sc.topk_logprobs.cpu(), sc.topk_ids.cpu().to(torch.int32)
        if targets:
            kl[idx] = sc.forward_kl.cpu()
    resp_sum = None
    if view is not None:
        view_lp = torch.zeros(total)
        for idx, sc in _views(model, [Sample(view, r) for r in responses], **kw):
            view_lp[idx] = sc.token_logprob.cpu()
        resp_sum = _per_sample(view_lp, resp_len).numpy()
    bounds = np.concatenate([[0], np.cumsum(resp_len)])

    def split(flat: torch.Tensor) -> list[np.ndarray]:  # (Σ r_i, ...) → N arrays (r_i, ...)
        return [flat[bounds[i] : bounds[i + 1]].numpy() for i in range(len(responses))]

    return Scores(
        _per_sample(tok_lp, resp_len).numpy(),
        resp_sum,
        split(tk_ids) if top_k else None,
        split(tk_lp) if top_k else None,
        _per_sample(kl, resp_len).numpy() if targets else None,
        split(tok_lp),
    )
