"""The learner's section."""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import Field, model_validator

from npd_core.config.base import Attention, Section
from npd_core.train_spec import StepSpec

STEP = StepSpec()  # the learner's defaults live with the plain spec the method reads


class TrainConfig(Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd", "ce", "sampled_reverse_kl"] = Field(
        STEP.loss,
        description="forward KL on teacher top-k (default), reverse KL, GKD JSD(β), "
        "hard-label CE on the teacher's argmax, or sampled_reverse_kl: the per-token advantage "
        "log p_T − log p_S at the sampled token (on-policy distillation's objective), weighted by "
        "the importance ratio to the generator truncated at train.ratio_clip (the generate and "
        "score stages then store per-token log-probs)",
    )
    beta: float = Field(
        STEP.beta, ge=0.0, le=1.0, description="JSD β (0 = forward KL, 1 = reverse KL)"
    )
    sft_weight: float = Field(
        STEP.sft_weight, ge=0.0, le=10.0, description="weight of CE on sampled tokens"
    )
    rest_mass: bool = Field(
        STEP.rest_mass,
        description="forward KL, reverse KL and JSD: the teacher's top-k ids and one bin for "
        "the mass outside them, for both models (else forward KL renormalizes the top-k and "
        "reverse KL and JSD give ids outside it a floor); exact either way when score.top_k "
        "covers the vocabulary",
    )
    normalize: Literal["token", "sequence"] = Field(
        STEP.normalize,
        description="token: a step's loss is the mean over its response tokens; sequence: "
        "each sequence's token mean, averaged over the step's sequences (GKD's 1/L_y), so long "
        "or unfinished samples do not dominate a step",
    )
    ratio_clip: float = Field(
        STEP.ratio_clip,
        ge=1.0,
        le=1000.0,
        description="sampled_reverse_kl: largest importance ratio p_learner / p_generator of a "
        "sampled token (truncated importance sampling: the samples come from an older student)",
    )
    loss_chunk_tokens: int = Field(
        STEP.loss_chunk_tokens,
        ge=0,
        le=1_048_576,
        description="response positions whose logits exist at once in the loss, forward and "
        "backward (LM head applied chunk by chunk: memory ~ chunk × vocabulary); 0 = full logits",
    )
    lr: float = Field(STEP.lr, gt=0.0, le=1.0, description="peak AdamW learning rate")
    min_lr_ratio: float = Field(
        STEP.min_lr_ratio, ge=0.0, le=1.0, description="cosine floor ÷ peak"
    )
    warmup_steps: int = Field(
        STEP.warmup_steps, ge=0, description="linear warmup steps at the start of the run"
    )
    weight_decay: float = Field(STEP.weight_decay, ge=0.0, le=1.0, description="AdamW weight decay")
    grad_clip: float = Field(STEP.grad_clip, gt=0.0, description="max global grad norm")
    steps_per_round: int = Field(
        STEP.steps_per_round, ge=1, le=10_000_000, description="optimizer steps per round"
    )
    epochs_per_round: float = Field(
        STEP.epochs_per_round, gt=0.0, le=100.0, description="passes over D_r at most"
    )
    rows_per_step: int = Field(
        STEP.rows_per_step, ge=1, description="packed rows per optimizer step"
    )
    micro_rows: int | None = Field(
        STEP.micro_rows,
        ge=1,
        description="packed rows per forward (gradient accumulation): a step's rows go through "
        "the model this many at a time and the update is the same (the loss is normalised over "
        "the whole step); none = all of a process's rows in one forward",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~1 more forward"
    )
    weights_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="the student's trained weights: float32 = fp32 master weights (bf16 compute "
        "by models.bf16 autocast); bfloat16 = pure bf16 weights and gradients with float32 AdamW "
        "moments (half the weight memory, no master copy; updates rounded to bf16)",
    )
    attention: Attention = Field(
        "auto",
        description="packed attention of the learner: auto = the fastest exact kernel of the "
        "device, timed once at the run's start and recorded in its spec (a retry reuses it); "
        "sdpa = SDPA with the block-diagonal mask from position ids; sdpa_varlen = SDPA per "
        "sequence; CUDA only: torch_varlen = torch's varlen_attn (torch >= 2.10, bf16), "
        "flex_document = compiled flex attention with a document mask, flash_varlen = "
        "flash-attn's varlen kernel (the flash-attn package, bf16)",
    )
    nproc: int = Field(
        1,
        ge=1,
        le=1024,
        description="learner processes (torchrun, one per GPU): each optimizer step's rows are "
        "split across them, so the update is the 1-process one; 1 = in the flow's process",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="with nproc > 1: ddp = replicated weights, all-reduced gradients; fsdp = "
        "weights, gradients and optimizer state sharded (FSDP2 fully_shard)",
    )
    keep_checkpoints: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="round checkpoints whose weights stay on disk: the best (eval.primary) and "
        "the last N rounds, plus any that a later round still generates from (staleness); the "
        "others are deleted once evaluated, and no round's weights go to MLflow; none = keep "
        "every round (the optimizer state is kept for the latest round only either way)",
    )

    @model_validator(mode="after")
    def _a_row_per_rank(self) -> TrainConfig:
        if self.rows_per_step < self.nproc:
            raise ValueError(
                f"train.rows_per_step ({self.rows_per_step}) < train.nproc ({self.nproc}): each "
                "learner process needs a packed row a step; raise rows_per_step or lower nproc"
            )
        return self

    @model_validator(mode="after")
    def _as_many_forwards_per_rank(self) -> TrainConfig:
        """Under DDP and FSDP every process forwards as often as the others (their collectives
        pair up), so the one with a row fewer needs a row for each of its forwards."""
        fewest, most = self.rows_per_step // self.nproc, -(-self.rows_per_step // self.nproc)
        forwards = self.step_spec().forwards(most)
        if forwards > fewest:
            raise ValueError(
                f"train.micro_rows ({self.micro_rows}): with rows_per_step {self.rows_per_step} "
                f"on nproc {self.nproc} a learner process has {fewest} rows for {forwards} "
                "forwards; raise micro_rows or make rows_per_step a multiple of nproc"
            )
        return self

    @property
    def needs_token_logprobs(self) -> bool:
        """The generate and score stages store per-token log-probs (for the sampled-token loss)."""
        return self.loss == "sampled_reverse_kl"

    def step_spec(self) -> StepSpec:
        """The settings ``method.train`` reads, as plain values."""
        return StepSpec(**{f.name: getattr(self, f.name) for f in fields(StepSpec)})
