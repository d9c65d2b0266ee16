"""The learner's settings as plain values: what ``method.train`` reads, without pydantic.

``TrainConfig.step_spec()`` produces a :class:`StepSpec` from a run's config, and the config's
fields take their defaults from here, so ``StepSpec()`` *is* the default config's learner: a bare
GPU box (torch and transformers, no pydantic) benchmarks the very step a run takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepSpec:
    """Loss, optimizer, schedule and batch of the learner's optimizer steps."""

    loss: str = "forward_kl"  # forward_kl, reverse_kl, jsd, ce, sampled_reverse_kl
    beta: float = 0.5  # JSD β
    rest_mass: bool = False  # KL/JSD: the mass outside the teacher's top-k as one bin
    normalize: str = "token"  # token: a step's loss ÷ its response tokens; sequence: GKD's 1/L_y
    ratio_clip: float = 2.0  # sampled_reverse_kl: the importance ratio to the generator at most
    sft_weight: float = 0.0  # weight of CE on the sampled tokens
    loss_chunk_tokens: int = 1024  # response positions per LM-head chunk; 0 = full logits
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine floor ÷ peak
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm
    steps_per_round: int = 150
    epochs_per_round: float = 8.0  # passes over D_r at most
    rows_per_step: int = 16  # packed rows per optimizer step
    micro_rows: int | None = None  # rows per forward (gradient accumulation); None = the step's

    def forwards(self, rows: int) -> int:
        """How many forwards a process takes for ``rows`` rows of one step (``micro_rows`` at
        most each; one when ``micro_rows`` is None)."""
        return 1 if self.micro_rows is None else max(1, math.ceil(rows / self.micro_rows))
