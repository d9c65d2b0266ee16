"""One rank of a data-parallel learner (torch.distributed: DDP, or FSDP2's ``fully_shard``).

N ranks take the 1-process step together: the response-token count of the whole step is
all-reduced first, then each rank forwards its share of the step's packed rows (in as many
micro-batches as every other rank, ``train.micro_rows``) and backpropagates each one's per-token
loss sum × N ÷ that count, the gradients reduced across ranks on the last backward only. DDP and
FSDP average gradients over the ranks, so the gradient is the whole step's token mean, as in one
process; clipping, AdamW and the lr schedule then do what they do there. Checkpoints hold the
full weights and the full optimizer state in the 1-process layout (``optimizer.state_dict()`` of
``make_optimizer``; under fsdp gathered from the shards, and sharded again on load, by
``torch.distributed.checkpoint.state_dict``), so a round may resume on any number of ranks.

Both wrappers need the whole loss inside one module forward (their hooks run around it, and the
chunked LM head calls the head outside the model's own forward): :class:`TokenLosses` is that
module. Needs an initialised default process group (``pipeline.workers`` starts one per rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from npd_core.method.optim import make_optimizer
from npd_core.method.packing import PackedBatch
from npd_core.method.train import (
    StepTotals,
    Targets,
    accumulate,
    apply_update,
    forward_losses,
    loss_units,
)
from npd_core.train_spec import StepSpec

Strategy = Literal["ddp", "fsdp"]
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0 only


class TokenLosses(nn.Module):
    """``forward_losses`` of the student as a module's forward: the unit DDP and FSDP wrap."""

    def __init__(self, student: PreTrainedModel, spec: StepSpec, bf16: bool) -> None:
        super().__init__()
        self.student, self.spec, self.bf16 = student, spec, bf16

    def forward(self, batch: PackedBatch, targets: Targets | None) -> torch.Tensor:
        return forward_losses(self.student, batch, targets, self.spec, bf16=self.bf16)


@dataclass
class DataParallel:
    """This rank's learner: the student (sharded in place under fsdp), its wrapped loss and
    its optimizer. ``train_round(shard=...)`` gives it rows ``rank::world`` of every step."""

    rank: int
    world: int
    strategy: Strategy
    student: PreTrainedModel
    loss: nn.Module  # DDP(TokenLosses) or fully_shard(TokenLosses)
    optimizer: torch.optim.Optimizer
    spec: StepSpec

    @classmethod
    def wrap(
        cls, student: PreTrainedModel, spec: StepSpec, strategy: Strategy, bf16: bool
    ) -> DataParallel:
        """Wrap ``student`` (the same weights on every rank) and make its optimizer."""
        loss = TokenLosses(student, spec, bf16)
        if strategy == "ddp":
            loss = DistributedDataParallel(loss)  # broadcasts rank 0's weights
        else:
            mesh = init_device_mesh(student.device.type, (dist.get_world_size(),))
            for layer in _decoder_layers(student):  # one all-gather per layer, bottom up
                fully_shard(layer, mesh=mesh)
            fully_shard(loss, mesh=mesh)  # the root: embeddings, final norm, LM head
            if dist.get_backend() == "gloo":  # gloo reduces with SUM only, no AVG
                for m in loss.modules():
                    if isinstance(m, FSDPModule):
                        m.set_force_sum_reduction_for_comms(True)
        opt = make_optimizer(student, spec)  # over DTensor shards under fsdp
        return cls(dist.get_rank(), dist.get_world_size(), strategy, student, loss, opt, spec)

    def update(
        self, micro: Sequence[PackedBatch], targets: Targets | None, *, lr: float, step: int
    ) -> StepTotals:
        """One optimizer step of the group; ``micro`` are this rank's rows of it, in as many
        micro-batches as on every other rank."""
        dev = self.student.device
        mine = StepTotals.of(0.0, micro)
        counts = [mine.loss_tokens, mine.real_tokens, mine.slots, loss_units(micro, self.spec)]
        step_counts = torch.tensor(counts, dtype=torch.float64, device=dev)
        dist.all_reduce(step_counts)  # (response tokens, real tokens, slots, loss units) of it
        n_all, real, slots, units = (int(x) for x in step_counts.tolist())

        def forward(batch: PackedBatch) -> torch.Tensor:  # × world: the wrappers average ranks
            return self.loss(batch, targets) * self.world

        share = accumulate(forward, micro, units, self._sync).to(dev, torch.float64)
        dist.all_reduce(share)  # world × the step's loss
        mean = share.item() / self.world
        apply_update(self.student, self.optimizer, mean, self.spec, lr=lr, step=step)
        return StepTotals(mean, n_all, real, slots)

    def _sync(self, last: bool) -> AbstractContextManager[Any]:
        """Gradients reduced across the ranks on a step's last backward only (accumulated
        locally before it)."""
        if self.strategy == "ddp":
            return nullcontext() if last else self.loss.no_sync()
        self.loss.set_requires_gradient_sync(last)
        return nullcontext()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's optimizer state (1-process layout) into this rank's optimizer,
        whatever number of ranks wrote it; every rank passes the full state."""
        if self.strategy == "ddp" or not state["state"]:  # replicated, or nothing to shard
            self.optimizer.load_state_dict(state)
            return
        names = self._param_names()
        by_name = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.student, self.optimizer, by_name, options=opts)

    def optimizer_state(self) -> dict[str, Any] | None:
        """The full optimizer state in the 1-process layout on rank 0, None on the others
        (a collective: every rank calls it)."""
        if self.strategy == "ddp" or not self.optimizer.state:  # replicated, or nothing yet
            return self.optimizer.state_dict() if self.rank == 0 else None
        full = get_optimizer_state_dict(self.student, self.optimizer, options=FULL)
        if self.rank != 0:
            return None
        index = {name: i for i, name in enumerate(self._param_names())}
        return {
            "state": {index[k]: v for k, v in full["state"].items()},
            "param_groups": [
                {**g, "params": [index[k] for k in g["params"]]} for g in full["param_groups"]
            ],
        }

    def full_student(self) -> PreTrainedModel | None:
        """The student with its full weights on rank 0 (under fsdp a plain copy built from the
        gathered weights), None on the others (a collective: every rank calls it)."""
        if self.strategy == "ddp":
            return self.student if self.rank == 0 else None
        weights = get_model_state_dict(self.student, options=FULL)
        if self.rank != 0:
            return None
        dtype = next(iter(weights.values())).dtype  # as trained (train.weights_dtype)
        plain = type(self.student)(self.student.config).to(dtype)
        plain.load_state_dict(weights, strict=False)  # tied weights may appear once
        plain.tie_weights()
        return plain

    def _param_names(self) -> list[str]:
        """The name of each optimizer parameter, in the optimizer's order (the 1-process
        layout's indices)."""
        name_of = {id(p): n for n, p in self.student.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]


def _decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The model's repeated blocks: the module classes HF never splits across devices."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layers (_no_split_modules)")
    return layers
