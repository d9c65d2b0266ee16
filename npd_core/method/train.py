"""Packed SFT on stored teacher targets: the learner of one round.

Reads top to bottom like nanoGPT's loop: lr → micro-batch forward → loss → backward → clip →
step → zero_grad → log. One optimizer step consumes ``rows_per_step`` packed rows, forwarded
``micro_rows`` at a time (gradient accumulation); the loss is normalized per response token
(or per sequence, ``train.normalize``) over the whole step, exactly as the unpacked batch in one
forward would be. Under ``filter.score: learner_ratio`` a step first weighs its sequences by
their learner ratios (:func:`ratio_weights`), and each sequence's loss takes its weight.

Settings come as a plain :class:`~npd_core.train_spec.StepSpec` (``TrainConfig.step_spec()``),
so the packing bench times this very step on a GPU box with nothing but torch and transformers.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedModel

from npd_core.errors import TrainingError
from npd_core.method import losses
from npd_core.method.filter import learner_ratio
from npd_core.method.head import chunked_rows, head_inputs
from npd_core.method.optim import lr_at, round_steps
from npd_core.method.packing import IGNORE_INDEX, PackedBatch, Sample, collate
from npd_core.models import autocast
from npd_core.train_spec import StepSpec


@dataclass
class Targets:
    """Teacher top-k per response position, flat over samples (sample i at ``offsets[i]``);
    for ``train.loss: sampled_reverse_kl`` also the teacher's and the generator's log-prob of
    each response token (the generator's NaN where a sequence has none: ``data.mix``)."""

    topk_ids: torch.Tensor  # (M, k) long
    topk_logprobs: torch.Tensor  # (M, k) float32
    offsets: list[int]  # (N,) start of each sample's rows
    teacher_token: torch.Tensor | None = None  # (M,) float32
    generator_token: torch.Tensor | None = None  # (M,) float32

    @classmethod
    def from_lists(
        cls,
        ids: list[np.ndarray],
        logprobs: list[np.ndarray],
        teacher_token: list[np.ndarray] | None = None,
        generator_token: list[np.ndarray] | None = None,
    ) -> Targets:
        lens = [len(a) for a in ids]
        offsets = np.concatenate([[0], np.cumsum(lens)])[:-1].astype(int).tolist()

        def flat(arrays: list[np.ndarray] | None) -> torch.Tensor | None:
            return None if arrays is None else torch.from_numpy(np.concatenate(arrays)).float()

        return cls(
            torch.from_numpy(np.concatenate(ids)).long(),
            torch.from_numpy(np.concatenate(logprobs)).float(),
            offsets,
            flat(teacher_token),
            flat(generator_token),
        )

    def subset(self, index: list[int]) -> Targets:
        """The targets of samples ``index`` (same table, re-pointed offsets)."""
        return replace(self, offsets=[self.offsets[i] for i in index])


@dataclass(frozen=True)
class PositionTargets:
    """:class:`Targets` at the M response positions of a batch, on the learner's device."""

    topk_ids: torch.Tensor  # (M, k) long
    topk_logprobs: torch.Tensor  # (M, k) float32
    teacher_token: torch.Tensor | None  # (M,)
    generator_token: torch.Tensor | None  # (M,)

    def __getitem__(self, s: slice) -> PositionTargets:
        return PositionTargets(*(None if x is None else x[s] for x in vars(self).values()))


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step over its whole batch (every rank's rows): the loss per response token
    and the counts the round's stats add up."""

    loss: float
    loss_tokens: int  # response tokens (the loss's denominator)
    real_tokens: int  # non-pad tokens
    slots: int  # rows × row length

    @classmethod
    def of(cls, loss: float, micro: Sequence[PackedBatch]) -> StepTotals:
        """The totals of a step whose rows are ``micro`` (one process's, every micro-batch)."""
        return cls(
            loss,
            sum(b.n_loss_tokens for b in micro),
            sum(b.n_real_tokens for b in micro),
            sum(b.input_ids.numel() for b in micro),
        )


@dataclass(frozen=True)
class StepWeights:
    """One step's sequence weights (``filter.score: learner_ratio``): the step's samples
    (indices into the round's, sorted), each one's learner ratio (NaN: no generator) and the
    weight its loss takes in the step."""

    index: torch.Tensor  # (S,) long, sorted
    ratio: torch.Tensor  # (S,) float32
    weight: torch.Tensor  # (S,) float32

    def at(self, seq: torch.Tensor) -> torch.Tensor:
        """The weight of each position's sequence: seq (M,) sample indices → (M,) float32."""
        index, weight = self.index.to(seq.device), self.weight.to(seq.device)
        return weight[torch.searchsorted(index, seq)]


Weigh = Callable[[np.ndarray], np.ndarray]  # a step's learner ratios (S,) → weights (S,)


@dataclass
class RoundStats:
    steps: int = 0
    train_tokens: int = 0
    loss_tokens: int = 0
    mean_loss: float = float("nan")
    fill_ratio: float = float("nan")
    log: list[StepLog] = field(default_factory=list)
    weights: dict[int, StepWeights] = field(default_factory=dict)  # by step; learner_ratio only


def _response(
    batch: PackedBatch, targets: Targets | None, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, PositionTargets | None]:
    """Where ``batch`` carries loss (B, T) bool, its labels there (M,) and the teacher's
    targets there (None: plain SFT)."""
    at = batch.labels != IGNORE_INDEX  # (B, T)
    labels = batch.labels[at].to(dev)  # (M,)
    if targets is None:
        return at.to(dev), labels, None
    idx = batch.target_index[at]  # (M,)

    def there(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[idx].to(dev)

    topk = PositionTargets(
        *(there(x) for x in (targets.topk_ids, targets.topk_logprobs)),  # (M, k) each
        there(targets.teacher_token),  # (M,)
        there(targets.generator_token),
    )
    return at.to(dev), labels, topk


def token_losses(
    z: torch.Tensor,
    labels: torch.Tensor,
    topk: PositionTargets | None,
    spec: StepSpec,
) -> torch.Tensor:
    """The configured loss of logit rows ``z`` (c, V) with their ``labels`` (c,) and the
    teacher's targets there; ``topk`` None is plain SFT (CE on the labels).
    Returns (c,) float32."""
    if topk is None:
        return losses.hard_ce(z, labels)
    tk_ids, tk_lp = topk.topk_ids, topk.topk_logprobs
    if spec.loss == "forward_kl":
        out = losses.forward_kl_topk(z, tk_ids, tk_lp, rest_mass=spec.rest_mass)
    elif spec.loss == "reverse_kl":
        out = losses.reverse_kl(z, tk_ids, tk_lp, rest_mass=spec.rest_mass)
    elif spec.loss == "jsd":
        out = losses.generalized_jsd(z, tk_ids, tk_lp, spec.beta, rest_mass=spec.rest_mass)
    elif spec.loss == "sampled_reverse_kl":
        if topk.teacher_token is None or topk.generator_token is None:
            raise TrainingError(
                "train.loss sampled_reverse_kl: the round's targets lack the teacher's or the "
                "generator's per-token log-probs; rerun its generate and score stages with it"
            )
        out = losses.sampled_reverse_kl(
            z, labels, topk.teacher_token, topk.generator_token, spec.ratio_clip
        )
    else:  # "ce": hard label on the teacher's argmax (top-k is sorted, so column 0)
        out = losses.hard_ce(z, tk_ids[:, 0])
    if spec.sft_weight:
        out = out + spec.sft_weight * losses.hard_ce(z, labels)
    return out


def per_token_loss(
    logits: torch.Tensor, batch: PackedBatch, targets: Targets | None, spec: StepSpec
) -> torch.Tensor:
    """The configured loss at every response position of ``batch`` from its full logits
    (B, T, V): the path of ``train.loss_chunk_tokens: 0`` and the reference of the chunked one.
    Positions with ``labels == IGNORE_INDEX`` (prompt, padding) carry no loss; ``targets is
    None`` means plain SFT (CE on the labels). Returns (M,) float32."""
    at, labels, topk = _response(batch, targets, logits.device)
    out = token_losses(logits[at], labels, topk, spec)  # logits[at]: (M, V)
    return _normalized(out, batch, at, spec)


def _normalized(
    per_token: torch.Tensor, batch: PackedBatch, at: torch.Tensor, spec: StepSpec
) -> torch.Tensor:
    """``train.normalize: sequence``: each position's loss (M,) × 1 ÷ its sequence's response
    tokens (``losses.sequence_weights``); per token, as it is."""
    if spec.normalize == "token":
        return per_token
    return per_token * losses.sequence_weights(batch.seq_ids[at.cpu()]).to(per_token.device)


def loss_units(
    micro: Sequence[PackedBatch], spec: StepSpec, weights: StepWeights | None = None
) -> int:
    """What a step's loss is divided by (``losses.token_mean``): its response tokens, or, with
    ``train.normalize: sequence``, its sequences that carry loss. With ``weights``, those of
    sequences of weight 0 do not count: a sample dropped in the step is as absent from it as
    one the filter stage dropped, so the loss's scale does not shrink with the drops."""
    units = 0
    for b in micro:
        seq = b.seq_ids[b.labels != IGNORE_INDEX]  # (M,)
        if weights is not None:
            seq = seq[weights.at(seq) > 0]
        units += seq.numel() if spec.normalize == "token" else seq.unique().numel()
    return units


def per_token_loss_chunked(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    batch: PackedBatch,
    targets: Targets | None,
    spec: StepSpec,
) -> torch.Tensor:
    """:func:`per_token_loss` from the last hidden state (B, T, H) and the LM ``head``,
    ``spec.loss_chunk_tokens`` response positions at a time (``method.head``): the student's
    log-normaliser over the full vocabulary per chunk, forward and backward, so at most
    chunk × V logits exist. Returns (M,) float32."""
    at, labels, topk = _response(batch, targets, hidden.device)

    def rows(z: torch.Tensor, s: slice) -> torch.Tensor:
        return token_losses(z, labels[s], None if topk is None else topk[s], spec)

    out = chunked_rows(hidden[at], head, rows, spec.loss_chunk_tokens)  # hidden[at]: (M, H)
    return _normalized(out, batch, at, spec)


def model_inputs(
    batch: PackedBatch, dev: torch.device, *, padded: bool = False, flatten: bool = False
) -> dict[str, torch.Tensor]:
    """How ``batch`` enters the model. The learner's way: position ids restarting per sequence,
    so a row holds several and right padding needs no mask. ``padded``: a 2D padding mask
    instead (the padded baseline a Trainer user runs, one sample a row); ``flatten``: the B rows
    as one (1, B·T) row (flash-attention's varlen path)."""
    B, T = batch.input_ids.shape
    inputs = {"input_ids": batch.input_ids.to(dev)}
    if padded:
        inputs["attention_mask"] = (batch.seq_ids >= 0).long().to(dev)  # (B, T)
    else:
        inputs["position_ids"] = batch.position_ids.to(dev)  # (B, T)
    if flatten:
        inputs = {k: v.reshape(1, B * T) for k, v in inputs.items()}
    return inputs


def forward_losses(
    model: PreTrainedModel,
    batch: PackedBatch,
    targets: Targets | None,
    spec: StepSpec,
    *,
    bf16: bool = True,
    padded: bool = False,
    flatten: bool = False,
) -> torch.Tensor:
    """Forward ``batch`` and return the configured loss at each of its response positions,
    (M,) float32: :func:`per_token_loss_chunked`, or from the full logits when
    ``spec.loss_chunk_tokens`` is 0. ``padded``/``flatten``: see :func:`model_inputs`."""
    dev = next(model.parameters()).device
    B, T = batch.input_ids.shape
    inputs = model_inputs(batch, dev, padded=padded, flatten=flatten)
    if spec.loss_chunk_tokens:
        hidden, head = head_inputs(model, inputs, bf16)
        hidden = hidden.view(B, T, -1)  # (B, T, H)
        return per_token_loss_chunked(hidden, head, batch, targets, spec)
    with autocast(bf16, dev):
        logits = model(**inputs, use_cache=False).logits.view(B, T, -1)  # (B, T, V)
    return per_token_loss(logits, batch, targets, spec)


def step_loss(
    model: PreTrainedModel,
    batch: PackedBatch,
    targets: Targets | None,
    spec: StepSpec,
    *,
    bf16: bool = True,
    padded: bool = False,
    flatten: bool = False,
) -> torch.Tensor:
    """The loss of ``batch`` in one forward: its per-token loss (:func:`forward_losses`)
    averaged over its response tokens, a scalar (fp32)."""
    per_token = forward_losses(
        model, batch, targets, spec, bf16=bf16, padded=padded, flatten=flatten
    )
    return losses.token_mean(per_token, loss_units([batch], spec))


@torch.no_grad()
def learner_logprobs(
    model: PreTrainedModel, batch: PackedBatch, spec: StepSpec, *, bf16: bool = True
) -> torch.Tensor:
    """The learner's log-prob of each response token of ``batch``, without gradient: (M,)
    float32, from the LM head ``spec.loss_chunk_tokens`` positions at a time (all at once when
    0), as the loss reads its logits."""
    dev = next(model.parameters()).device
    B, T = batch.input_ids.shape
    hidden, head = head_inputs(model, model_inputs(batch, dev), bf16)
    at, labels, _ = _response(batch, None, dev)

    def logprob(z: torch.Tensor, s: slice) -> torch.Tensor:  # z (c, V) → (c,)
        return torch.log_softmax(z.float(), -1).gather(-1, labels[s, None]).squeeze(-1)

    size = spec.loss_chunk_tokens or max(1, len(labels))
    return chunked_rows(hidden.view(B, T, -1)[at], head, logprob, size)  # hidden: (B, T, H)


def ratio_weights(
    model: PreTrainedModel,
    micro: Sequence[PackedBatch],
    targets: Targets,
    spec: StepSpec,
    weigh: Weigh,
    *,
    bf16: bool = True,
) -> StepWeights:
    """The weights of a step's sequences under ``filter.score: learner_ratio``: each
    sequence's learner ratio (``filter.learner_ratio``) over the whole step, then ``weigh``
    (``filter.step_weights`` with the run's rule). Taken before the step's first backward by a
    forward of every micro-batch without gradient, so the rule sees the whole step whatever
    ``micro_rows`` is: about a third more compute a step (one forward more beside each
    forward and backward) and no more memory than one micro-batch's forward. A step of one
    forward could read them from its own forward instead; one path keeps ``micro_rows`` 1
    and the one-forward step identical."""
    if targets.generator_token is None:
        raise TrainingError(
            "filter.score learner_ratio: the round's targets lack the generator's per-token "
            "log-probs (samples.token_logprobs); rerun its generate stage with this config"
        )
    learner, generator, seq = [], [], []
    for b in micro:
        at = b.labels != IGNORE_INDEX  # (B, T)
        learner.append(learner_logprobs(model, b, spec, bf16=bf16).cpu())  # (M,)
        generator.append(targets.generator_token[b.target_index[at]])  # (M,)
        seq.append(b.seq_ids[at])  # (M,)
    index, local = torch.unique(torch.cat(seq), return_inverse=True)  # (S,), (ΣM,)
    ratio = learner_ratio(torch.cat(learner), torch.cat(generator), local, len(index))
    weight = torch.from_numpy(weigh(ratio.numpy())).float()  # (S,)
    return StepWeights(index, ratio, weight)


def micro_batches(
    samples: list[Sample],
    rows: list[list[int]],
    pad_id: int,
    forwards: int,
    row_len: int | None = None,
    target_offsets: list[int] | None = None,
) -> list[PackedBatch]:
    """``rows`` (a process's rows of one step, in order) as ``forwards`` micro-batches whose
    numbers of rows differ by one at most (``collate``'s other arguments as there)."""
    assert len(rows) >= forwards, (len(rows), forwards)  # the config validates it
    cut = [len(rows) * k // forwards for k in range(forwards + 1)]
    return [
        collate(samples, rows[a:b], pad_id, row_len=row_len, target_offsets=target_offsets)
        for a, b in itertools.pairwise(cut)
    ]


def accumulate(
    forward: Callable[[PackedBatch], torch.Tensor],
    micro: Sequence[PackedBatch],
    n_tokens: int,
    sync: Callable[[bool], AbstractContextManager[Any]] | None = None,
) -> torch.Tensor:
    """Forward and backward every micro-batch of one step, before its update. Each
    backpropagates its share of the step's token mean, its per-token loss sum ÷ ``n_tokens``
    (the whole step's :func:`loss_units`, counted before any forward), so the gradients add
    up to those of the step in one forward, however its rows are split. ``forward``: the
    per-token losses (M,) of a micro-batch; ``sync(last)``: a data-parallel wrapper's context
    that reduces the gradients on the last backward only. Returns the sum of the micro-batches'
    losses (detached fp32 scalar): the step's loss, or this process's share of it."""
    parts = []
    for j, batch in enumerate(micro):
        with sync(j == len(micro) - 1) if sync else nullcontext():
            loss = losses.token_mean(forward(batch), n_tokens)
            loss.backward()
        parts.append(loss.detach())
    return torch.stack(parts).sum()


def apply_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: float,
    spec: StepSpec,
    *,
    lr: float,
    step: int,
) -> None:
    """The update of a step whose gradients are in place (:func:`accumulate`): check the
    step's ``loss`` is finite → set lr → clip → step → zero_grad. A non-finite loss leaves the
    weights as they were."""
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(
            f"non-finite loss ({loss}) at step {step}; round stopped, "
            "last good checkpoint kept; lower train.lr or check the targets"
        )
    for g in optimizer.param_groups:
        g["lr"] = lr
    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_gradients(
    model: PreTrainedModel,
    micro: Sequence[PackedBatch],
    targets: Targets | None,
    spec: StepSpec,
    *,
    bf16: bool = True,
    padded: bool = False,
    flatten: bool = False,
    weights: StepWeights | None = None,
) -> torch.Tensor:
    """The gradients of a step on its micro-batches (:func:`accumulate` of
    :func:`forward_losses`), before its update. ``weights`` (:func:`ratio_weights`): each
    sequence's per-token losses × its weight, over the units of the sequences that weigh more
    than 0 (:func:`loss_units`). Returns the (detached) step loss."""

    def forward(b: PackedBatch) -> torch.Tensor:
        out = forward_losses(model, b, targets, spec, bf16=bf16, padded=padded, flatten=flatten)
        if weights is None:
            return out
        return out * weights.at(b.seq_ids[b.labels != IGNORE_INDEX]).to(out.device)  # (M,)

    return accumulate(forward, micro, loss_units(micro, spec, weights))


def optimizer_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: PackedBatch | Sequence[PackedBatch],
    targets: Targets | None,
    spec: StepSpec,
    *,
    lr: float,
    step: int,
    bf16: bool = True,
    padded: bool = False,
    flatten: bool = False,
    weights: StepWeights | None = None,
) -> torch.Tensor:
    """One update on a step's rows, packed or padded, as one ``batch`` or as its micro-batches:
    forward → per-token loss → backward for each (:func:`step_gradients`) → clip → step →
    zero_grad (:func:`apply_update`). Shared by the NPD learner, the baselines and the benches,
    so every method takes (and the benches time) exactly the same step. Returns the (detached)
    step loss."""
    micro = [batch] if isinstance(batch, PackedBatch) else batch
    loss = step_gradients(
        model, micro, targets, spec, bf16=bf16, padded=padded, flatten=flatten, weights=weights
    )
    apply_update(model, optimizer, loss.item(), spec, lr=lr, step=step)
    return loss


class Ranks(Protocol):
    """This process as one rank of a data-parallel learner (``method.data_parallel``)."""

    rank: int
    world: int

    def update(
        self, micro: Sequence[PackedBatch], targets: Targets | None, *, lr: float, step: int
    ) -> StepTotals:
        """One optimizer step of the group on this rank's micro-batches of it."""
        ...


def train_round(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    samples: list[Sample],
    targets: Targets | None,
    rows: list[list[int]],
    spec: StepSpec,
    row_len: int,
    *,
    start_step: int,
    total_steps: int,
    seed: int,
    pad_id: int,
    bf16: bool = True,
    on_step: Callable[[StepLog], None] | None = None,
    shard: Ranks | None = None,
    weigh: Weigh | None = None,
) -> RoundStats:
    """Train for at most ``steps_per_round`` optimizer steps on ``rows`` (from ``pack``, each
    ``row_len`` long) of ``samples`` (already within it); ``targets.offsets`` align with
    ``samples``. ``shard``: this process is one rank of a data-parallel learner; it trains on
    rows rank, rank + world, … of each step and the group takes the 1-process step together.
    Each process forwards its rows of a step ``micro_rows`` at a time, every rank as often.
    ``weigh`` (``filter.score: learner_ratio``, one process only): every step weighs its
    sequences by their learner ratios (:func:`ratio_weights`), kept in the stats by step."""
    assert weigh is None or (shard is None and targets is not None)  # the config checks it
    stats = RoundStats()
    if not rows:
        return stats
    n_steps = round_steps(len(rows), spec)
    rank, world = (0, 1) if shard is None else (shard.rank, shard.world)
    per_step = spec.rows_per_step
    forwards = spec.forwards(-(-per_step // world))  # the same on every rank
    offsets = targets.offsets if targets is not None else None
    rng = random.Random(seed)
    stream: list[int] = list(range(len(rows)))  # rows are already in a seeded order
    while len(stream) < n_steps * per_step:  # later passes over D_r reshuffle
        perm = list(range(len(rows)))
        rng.shuffle(perm)
        stream += perm
    model.train()
    loss_sum, real, capacity = 0.0, 0, 0
    for i in range(n_steps):
        t0 = time.perf_counter()
        step = start_step + i
        lr = lr_at(step, spec, total_steps)
        step_rows = [rows[j] for j in stream[i * per_step : (i + 1) * per_step]]
        micro = micro_batches(samples, step_rows[rank::world], pad_id, forwards, row_len, offsets)
        if shard is not None:
            done = shard.update(micro, targets, lr=lr, step=step)
        else:
            weights = None
            if weigh is not None:
                weights = ratio_weights(model, micro, targets, spec, weigh, bf16=bf16)
                stats.weights[step] = weights
            loss = optimizer_step(
                model, optimizer, micro, targets, spec, lr=lr, step=step, bf16=bf16,
                weights=weights,
            )  # fmt: skip
            done = StepTotals.of(loss.item(), micro)
        dt = time.perf_counter() - t0
        loss_sum += done.loss * done.loss_tokens
        stats.loss_tokens += done.loss_tokens
        stats.train_tokens += done.real_tokens
        real += done.real_tokens
        capacity += done.slots
        entry = StepLog(step, done.loss, lr, done.real_tokens, done.real_tokens / dt)
        stats.log.append(entry)
        if on_step:
            on_step(entry)
    stats.steps = n_steps
    stats.mean_loss = loss_sum / max(1, stats.loss_tokens)
    stats.fill_ratio = real / max(1, capacity)
    return stats
