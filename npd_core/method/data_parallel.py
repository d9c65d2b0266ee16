"""One rank of a data-parallel learner (torch.distributed: DDP, or FSDP2's ``fully_shard``).

N ranks take the 1-process step together: each forwards its share of the step's packed rows,
the response-token count of the whole step is all-reduced, and each rank backpropagates its
per-token loss sum × N ÷ that count. DDP and FSDP average gradients over the ranks, so the
gradient is the whole step's token mean, as in one process; clipping, AdamW and the lr schedule
then do what they do there. Checkpoints hold the full weights and the full optimizer state in
the 1-process layout (``optimizer.state_dict()`` of ``make_optimizer``; under fsdp gathered from
the shards, and sharded again on load, by ``torch.distributed.checkpoint.state_dict``), so a
round may resume on any number of ranks.

Both wrappers need the whole loss inside one module forward (their hooks run around it, and the
chunked LM head calls the head outside the model's own forward): :class:`StepLoss` is that
module. Needs an initialised default process group (``pipeline.workers`` starts one per rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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

from npd_core.method.packing import PackedBatch
from npd_core.method.train import StepTotals, Targets, descend, make_optimizer, step_loss

if TYPE_CHECKING:
    from npd_core.config import TrainConfig

Strategy = Literal["ddp", "fsdp"]
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0 only


class StepLoss(nn.Module):
    """``step_loss`` of the student as a module's forward: the unit DDP and FSDP wrap."""

    def __init__(self, student: PreTrainedModel, cfg: TrainConfig, bf16: bool) -> None:
        super().__init__()
        self.student, self.cfg, self.bf16 = student, cfg, bf16

    def forward(self, batch: PackedBatch, targets: Targets | None) -> torch.Tensor:
        return step_loss(self.student, batch, targets, self.cfg, bf16=self.bf16)


@dataclass
class DataParallel:
    """This rank's learner: the student (sharded in place under fsdp), its wrapped loss and
    its optimizer. ``train_round(shard=...)`` gives it rows ``rank::world`` of every step."""

    rank: int
    world: int
    strategy: Strategy
    student: PreTrainedModel
    loss: nn.Module  # DDP(StepLoss) or fully_shard(StepLoss)
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig

    @classmethod
    def wrap(
        cls, student: PreTrainedModel, cfg: TrainConfig, strategy: Strategy, bf16: bool
    ) -> DataParallel:
        """Wrap ``student`` (the same weights on every rank) and make its optimizer."""
        loss = StepLoss(student, cfg, bf16)
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
        opt = make_optimizer(student, cfg)  # over DTensor shards under fsdp
        return cls(dist.get_rank(), dist.get_world_size(), strategy, student, loss, opt, cfg)

    def update(
        self, batch: PackedBatch, targets: Targets | None, *, lr: float, step: int
    ) -> StepTotals:
        """One optimizer step of the group; ``batch`` is this rank's rows of it."""
        local = self.loss(batch, targets)  # this rank's token mean, fp32 scalar
        n = batch.n_loss_tokens
        sums = torch.tensor(
            [local.item() * n, n, batch.n_real_tokens, batch.input_ids.numel()],
            dtype=torch.float64,
            device=local.device,
        )
        dist.all_reduce(sums)  # (loss sum, response tokens, real tokens, slots) of the step
        loss_sum, n_all, real, slots = sums.tolist()
        mean = loss_sum / max(n_all, 1)
        share = local * (max(n, 1) * self.world / max(n_all, 1))  # Σ_rank × world ÷ n_all
        descend(self.student, self.optimizer, share, self.cfg, lr=lr, step=step, total_loss=mean)
        return StepTotals(mean, int(n_all), int(real), int(slots))

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
