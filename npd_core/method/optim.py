"""The learner's optimizer and schedule, the same for every method: AdamW (with float32 moments
for bfloat16 weights), linear warmup then cosine, the steps a round takes, and where the
schedule's horizon falls when rounds end early."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import PreTrainedModel

from npd_core.train_spec import StepSpec


def lr_at(step: int, spec: StepSpec, total_steps: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio × lr`` at ``total_steps``."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(1, total_steps - spec.warmup_steps)
    t = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.lr * spec.min_lr_ratio
    return floor + 0.5 * (spec.lr - floor) * (1 + math.cos(math.pi * t))


def round_steps(n_rows: int, spec: StepSpec) -> int:
    """Optimizer steps of a round of ``n_rows`` packed rows: ``steps_per_round``, or fewer when
    ``epochs_per_round`` passes over the rows come first."""
    return min(spec.steps_per_round, math.ceil(spec.epochs_per_round * n_rows / spec.rows_per_step))


def lr_horizon(start_step: int, n_rows: int, rounds_left: int, spec: StepSpec) -> int:
    """The step at which ``lr_at``'s cosine ends, re-estimated each round: the steps taken so
    far plus this round's for every round left (this one included), so the schedule ends with
    the last round even where the epoch bound cuts ``steps_per_round`` short."""
    return start_step + round_steps(n_rows, spec) * rounds_left


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


def make_optimizer(model: PreTrainedModel, spec: StepSpec) -> torch.optim.Optimizer:
    """The learner's AdamW (β = 0.9, 0.95) at ``spec.lr``; every method trains with it. Weights
    in bfloat16 (``train.weights_dtype``) get :class:`AdamWBF16`, whose moments are float32."""
    kw = dict(lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return AdamWBF16(model.parameters(), **kw)
    return torch.optim.AdamW(model.parameters(), **kw)
