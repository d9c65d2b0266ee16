"""Packed SFT on stored teacher targets: the learner of one round.

Reads top to bottom like nanoGPT's loop: lr → micro-batch forward → loss → backward → clip →
step → zero_grad → log. One optimizer step consumes ``rows_per_step`` packed rows; the loss is
normalized per response token over the whole step, exactly as the unpacked batch would be.

The step itself (:func:`optimizer_step`) reads its settings by name from a ``TrainConfig`` or a
plain :class:`StepSpec`, and this module imports the config only for type checking: the packing
bench times this very step on a GPU box with nothing but torch and transformers.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel

from npd_core.errors import TrainingError
from npd_core.method import losses
from npd_core.method.head import chunked_rows, head_inputs
from npd_core.method.packing import IGNORE_INDEX, PackedBatch, Sample, collate
from npd_core.models import autocast

if TYPE_CHECKING:
    from npd_core.config import PackConfig, TrainConfig
    from npd_core.method.data_parallel import DataParallel


@dataclass
class Targets:
    """Teacher top-k per response position, flat over samples (sample i at ``offsets[i]``)."""

    topk_ids: torch.Tensor  # (M, k) long
    topk_logprobs: torch.Tensor  # (M, k) float32
    offsets: list[int]  # (N,) start of each sample's rows

    @classmethod
    def from_lists(cls, ids: list[np.ndarray], logprobs: list[np.ndarray]) -> Targets:
        lens = [len(a) for a in ids]
        offsets = np.concatenate([[0], np.cumsum(lens)])[:-1].astype(int).tolist()
        return cls(
            torch.from_numpy(np.concatenate(ids)).long(),
            torch.from_numpy(np.concatenate(logprobs)).float(),
            offsets,
        )

    def subset(self, index: list[int]) -> Targets:
        """The targets of samples ``index`` (same table, re-pointed offsets)."""
        return Targets(self.topk_ids, self.topk_logprobs, [self.offsets[i] for i in index])


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
    def of(cls, loss: float, batch: PackedBatch) -> StepTotals:
        return cls(loss, batch.n_loss_tokens, batch.n_real_tokens, batch.input_ids.numel())


@dataclass
class RoundStats:
    steps: int = 0
    train_tokens: int = 0
    loss_tokens: int = 0
    mean_loss: float = float("nan")
    fill_ratio: float = float("nan")
    log: list[StepLog] = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio × lr`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * t))


def round_steps(n_rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps of a round of ``n_rows`` packed rows: ``steps_per_round``, or fewer when
    ``epochs_per_round`` passes over the rows come first."""
    return min(cfg.steps_per_round, math.ceil(cfg.epochs_per_round * n_rows / cfg.rows_per_step))


def lr_horizon(start_step: int, n_rows: int, rounds_left: int, cfg: TrainConfig) -> int:
    """The step at which ``lr_at``'s cosine ends, re-estimated each round: the steps taken so
    far plus this round's for every round left (this one included), so the schedule ends with
    the last round even where the epoch bound cuts ``steps_per_round`` short."""
    return start_step + round_steps(n_rows, cfg) * rounds_left


@dataclass(frozen=True)
class StepSpec:
    """The loss and optimizer settings of one learner step as plain values: the fields of
    ``TrainConfig`` with the same names and defaults (a test keeps them equal). The step
    functions below take either, so a caller without pydantic (the packing bench) passes this."""

    loss: str = "forward_kl"  # forward_kl, reverse_kl, jsd, ce
    beta: float = 0.5  # JSD β
    rest_mass: bool = False  # forward KL: the mass outside the teacher's top-k as one bin
    sft_weight: float = 0.0  # weight of CE on the sampled tokens
    loss_chunk_tokens: int = 1024  # response positions per LM-head chunk; 0 = full logits
    lr: float = 3e-3  # peak AdamW learning rate
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm


def checkpoint_activations(model: PreTrainedModel, on: bool) -> PreTrainedModel:
    """``train.gradient_checkpointing``: each decoder layer's activations are recomputed in the
    backward pass instead of kept, so their memory stops growing with depth, for about one more
    forward per step. Non-reentrant checkpoints (torch's recommended kind, and the packed
    attention's position ids pass through them); only while the model is in training mode."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


WEIGHTS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def learner_dtype(setting: str) -> torch.dtype:
    """``train.weights_dtype`` resolved: float32 master weights (bf16 compute comes from
    ``models.bf16`` autocast), or pure bfloat16 weights and gradients (half the weight memory
    and no master copy; the optimizer keeps its moments in float32, :class:`AdamWBF16`)."""
    return WEIGHTS_DTYPES[setting]


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bfloat16 weights with float32 optimizer state.

    ``torch.optim.AdamW`` keeps its moments in the weights' dtype, and bf16's 8-bit mantissa
    cannot hold the second moment's small updates; here both moments are float32, and each
    update is computed in float32 from the weight, the gradient and the moments (one tensor at
    a time) and rounded to bf16 once. Same step as ``torch.optim.AdamW`` (its single-tensor
    path): float32 weights give its numbers (tested). ``load_state_dict`` keeps the moments
    float32 (the base class casts state to the weights' dtype).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g = p.grad.float()
                w = p.float()
                w.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1 - b1**t))
                p.copy_(w)  # the one rounding to the weights' dtype
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(params, saved, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step":
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)


def make_optimizer(model: PreTrainedModel, cfg: StepSpec | TrainConfig) -> torch.optim.Optimizer:
    """The learner's AdamW (β = 0.9, 0.95) at ``cfg.lr``; every method trains with it. Weights
    in bfloat16 (``train.weights_dtype``) get :class:`AdamWBF16`, whose moments are float32."""
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return AdamWBF16(model.parameters(), **kw)
    return torch.optim.AdamW(model.parameters(), **kw)


def _response(
    batch: PackedBatch, targets: Targets | None, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Where ``batch`` carries loss (B, T) bool, its labels there (M,) and the teacher's top-k
    ids and log-probs there, (M, k) each (None: plain SFT)."""
    at = batch.labels != IGNORE_INDEX  # (B, T)
    labels = batch.labels[at].to(dev)  # (M,)
    if targets is None:
        return at.to(dev), labels, None
    idx = batch.target_index[at]
    topk = (targets.topk_ids[idx].to(dev), targets.topk_logprobs[idx].to(dev))  # (M, k) each
    return at.to(dev), labels, topk


def token_losses(
    z: torch.Tensor,
    labels: torch.Tensor,
    topk: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: StepSpec | TrainConfig,
) -> torch.Tensor:
    """The configured loss of logit rows ``z`` (c, V) with their ``labels`` (c,) and teacher
    ``topk`` (ids, log-probs), (c, k) each; ``topk`` None is plain SFT (CE on the labels).
    Returns (c,) float32."""
    if topk is None:
        return losses.hard_ce(z, labels)
    tk_ids, tk_lp = topk
    if cfg.loss == "forward_kl":
        out = losses.forward_kl_topk(z, tk_ids, tk_lp, rest_mass=cfg.rest_mass)
    elif cfg.loss == "reverse_kl":
        out = losses.reverse_kl(z, tk_ids, tk_lp)
    elif cfg.loss == "jsd":
        out = losses.generalized_jsd(z, tk_ids, tk_lp, cfg.beta)
    else:  # "ce": hard label on the teacher's argmax (top-k is sorted, so column 0)
        out = losses.hard_ce(z, tk_ids[:, 0])
    if cfg.sft_weight:
        out = out + cfg.sft_weight * losses.hard_ce(z, labels)
    return out


def per_token_loss(
    logits: torch.Tensor, batch: PackedBatch, targets: Targets | None, cfg: StepSpec | TrainConfig
) -> torch.Tensor:
    """The configured loss at every response position of ``batch`` from its full logits
    (B, T, V): the path of ``train.loss_chunk_tokens: 0`` and the reference of the chunked one.
    Positions with ``labels == IGNORE_INDEX`` (prompt, padding) carry no loss; ``targets is
    None`` means plain SFT (CE on the labels). Returns (M,) float32."""
    at, labels, topk = _response(batch, targets, logits.device)
    return token_losses(logits[at], labels, topk, cfg)  # logits[at]: (M, V)


def per_token_loss_chunked(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    batch: PackedBatch,
    targets: Targets | None,
    cfg: StepSpec | TrainConfig,
) -> torch.Tensor:
    """:func:`per_token_loss` from the last hidden state (B, T, H) and the LM ``head``,
    ``cfg.loss_chunk_tokens`` response positions at a time (``method.head``): the student's
    log-normaliser over the full vocabulary per chunk, forward and backward, so at most
    chunk × V logits exist. Returns (M,) float32."""
    at, labels, topk = _response(batch, targets, hidden.device)

    def rows(z: torch.Tensor, s: slice) -> torch.Tensor:
        return token_losses(z, labels[s], None if topk is None else (topk[0][s], topk[1][s]), cfg)

    return chunked_rows(hidden[at], head, rows, cfg.loss_chunk_tokens)  # hidden[at]: (M, H)


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


def step_loss(
    model: PreTrainedModel,
    batch: PackedBatch,
    targets: Targets | None,
    cfg: StepSpec | TrainConfig,
    *,
    bf16: bool = True,
    padded: bool = False,
    flatten: bool = False,
) -> torch.Tensor:
    """Forward ``batch`` and return its loss: the per-token loss averaged over the batch's
    response tokens (a scalar, fp32): :func:`per_token_loss_chunked`, or from the full logits
    when ``cfg.loss_chunk_tokens`` is 0. ``padded``/``flatten``: see :func:`model_inputs`."""
    dev = next(model.parameters()).device
    B, T = batch.input_ids.shape
    inputs = model_inputs(batch, dev, padded=padded, flatten=flatten)
    if cfg.loss_chunk_tokens:
        hidden, head = head_inputs(model, inputs, bf16)
        hidden = hidden.view(B, T, -1)  # (B, T, H)
        per_token = per_token_loss_chunked(hidden, head, batch, targets, cfg)
    else:
        with autocast(bf16, dev):
            logits = model(**inputs, use_cache=False).logits.view(B, T, -1)  # (B, T, V)
        per_token = per_token_loss(logits, batch, targets, cfg)
    return losses.token_mean(per_token, batch.n_loss_tokens)


def optimizer_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: PackedBatch,
    targets: Targets | None,
    cfg: StepSpec | TrainConfig,
    *,
    lr: float,
    step: int,
    bf16: bool = True,
    padded: bool = False,
    flatten: bool = False,
) -> torch.Tensor:
    """One update on ``batch`` (packed or padded rows): set lr → forward → per-token loss →
    backward → clip → step → zero_grad. Shared by the NPD learner, the baselines and the
    packing bench, so every method takes (and the bench times) exactly the same step. Returns
    the (detached) step loss."""
    loss = step_loss(model, batch, targets, cfg, bf16=bf16, padded=padded, flatten=flatten)
    descend(model, optimizer, loss, cfg, lr=lr, step=step)
    return loss.detach()


def descend(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    cfg: StepSpec | TrainConfig,
    *,
    lr: float,
    step: int,
    total_loss: float | None = None,
) -> None:
    """The update of one step from its ``loss``: check the step's loss is finite → set lr →
    backward → clip → step → zero_grad. ``total_loss``: the whole step's loss where ``loss`` is
    only this process's share of it (a data-parallel rank, ``method.data_parallel``)."""
    value = loss if total_loss is None else torch.tensor(total_loss)
    if not torch.isfinite(value):
        raise TrainingError(
            f"non-finite loss ({value.item()}) at step {step}; round stopped, "
            "last good checkpoint kept; lower train.lr or check the targets"
        )
    for g in optimizer.param_groups:
        g["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_round(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    samples: list[Sample],
    targets: Targets | None,
    rows: list[list[int]],
    cfg: TrainConfig,
    pack_cfg: PackConfig,
    *,
    start_step: int,
    total_steps: int,
    seed: int,
    pad_id: int,
    bf16: bool = True,
    on_step: Callable[[StepLog], None] | None = None,
    shard: DataParallel | None = None,
) -> RoundStats:
    """Train for at most ``steps_per_round`` optimizer steps on ``rows`` (from ``pack``) of
    ``samples`` (already within ``max_seq_len``); ``targets.offsets`` align with ``samples``.
    ``shard``: this process is one rank of a data-parallel learner; it trains on rows rank,
    rank + world, … of each step and the group takes the 1-process step together."""
    stats = RoundStats()
    if not rows:
        return stats
    n_steps = round_steps(len(rows), cfg)
    rng = random.Random(seed)
    stream: list[int] = list(range(len(rows)))  # rows are already in a seeded order
    while len(stream) < n_steps * cfg.rows_per_step:  # later passes over D_r reshuffle
        perm = list(range(len(rows)))
        rng.shuffle(perm)
        stream += perm
    model.train()
    loss_sum, real, capacity = 0.0, 0, 0
    for i in range(n_steps):
        t0 = time.perf_counter()
        step = start_step + i
        lr = lr_at(step, cfg, total_steps)
        step_rows = [rows[j] for j in stream[i * cfg.rows_per_step : (i + 1) * cfg.rows_per_step]]
        batch = collate(
            samples,
            step_rows if shard is None else step_rows[shard.rank :: shard.world],
            pad_id,
            row_len=pack_cfg.max_seq_len,
            target_offsets=targets.offsets if targets is not None else None,
        )
        if shard is not None:
            done = shard.update(batch, targets, lr=lr, step=step)
        else:
            loss = optimizer_step(
                model, optimizer, batch, targets, cfg, lr=lr, step=step, bf16=bf16
            )
            done = StepTotals.of(loss.item(), batch)
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
