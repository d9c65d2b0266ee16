"""The sections of the stages that produce a round's data: models, data, generate, score,
filter and pack."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from npd_core.config.base import Attention, MemoryGB, Section, deprecated
from npd_core.data import ANSWER_FIELD, ID_FIELD, PROMPT_FIELD


class ModelsConfig(Section):
    teacher: str | None = Field(
        None, description="HF checkpoint dir of the teacher; none = toy world"
    )
    student: str | None = Field(
        None, description="HF checkpoint dir of the student; none = toy world"
    )
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="weights of the models that only run forward (teacher, generator snapshot, "
        "evaluation); auto = bfloat16 on CUDA, float32 on CPU",
    )
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast for forward passes; auto = on CUDA, off on CPU (most CPUs "
        "emulate bf16: 15x slower than float32 on the toy teacher here)",
    )


class MixConfig(Section):
    fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of each round's training sequences taken from the fixed source "
        "instead of the student (GKD's 1 − λ); 0 = every sequence the student's own sample",
    )
    source: Literal["teacher", "reference"] = Field(
        "teacher",
        description="teacher = the teacher's own sample of the prompt (temperature 1, one seed "
        "per prompt and sample index, decoded once and reused by later rounds); reference = "
        "the prompt's reference answer; either scored by the teacher and trained with the same "
        "loss (stored with samples.source)",
    )


class DataConfig(Section):
    prompts: str | None = Field(
        None,
        description="train prompts: a JSONL or Parquet file, a glob of them (read in sorted "
        "order), a folder of shards or a datasets save_to_disk folder; ids unique across it",
    )
    eval_prompts: str | None = Field(
        None, description="held-out prompts, in any form data.prompts takes; none = toy world"
    )
    prompt_field: str = Field(
        PROMPT_FIELD,
        min_length=1,
        description="field holding the prompt: a string, or a list of {role, content} turns "
        "(a 'messages' field is read when the row has no such field)",
    )
    answer_field: str = Field(
        ANSWER_FIELD,
        min_length=1,
        description="field holding the reference answer (optional; a conversation's trailing "
        "assistant turn is the answer when it is absent)",
    )
    id_field: str = Field(
        ID_FIELD, min_length=1, description="field holding the prompt id (optional; unique)"
    )
    split: str | None = Field(
        None,
        description="split of a save_to_disk DatasetDict folder; none = its only split",
    )
    allow_overlap: bool = Field(
        False,
        description="accept eval prompts that are also train prompts (exact text), with a "
        "warning and their count; false = refuse the run",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto",
        description="auto = format prompts with the tokenizer's chat template when it has one "
        "(add_generation_prompt; a string is one user turn); none = plain strings tokenised "
        "raw (conversations need a template)",
    )
    stop: list[str] = Field(
        default_factory=list, description="extra stop strings (EOS always stops)"
    )
    prompts_per_round: int = Field(
        2048, ge=1, le=10_000_000, description="prompts sampled per round"
    )
    eval_size: int | None = Field(None, ge=1, description="held-out prompts evaluated; none = all")
    mix: MixConfig = Field(
        default_factory=MixConfig,
        description="mixed data (GKD's λ): a share of each round's sequences from a fixed source",
    )

    def reader_options(self) -> dict[str, Any]:
        """The keyword arguments of ``data.read_prompts`` this section sets."""
        return dict(
            prompt_field=self.prompt_field,
            answer_field=self.answer_field,
            id_field=self.id_field,
            split=self.split,
        )


class GenerateConfig(Section):
    backend: Literal["hf", "vllm", "auto"] = Field(
        "hf",
        description="generation engine: hf (transformers), vllm (the vllm extra: make vllm), "
        "auto (vllm when installed, else hf)",
    )
    n_per_prompt: int = Field(1, ge=1, le=64, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(32, ge=1, le=32768, description="response length cap")
    batch_size: int = Field(
        256, ge=1, le=65536, description="sequences decoded together, at most (see memory_gb)"
    )
    memory_gb: MemoryGB = Field(
        "auto",
        description="device memory a decoding batch may fill (each row's KV cache, layers × kv "
        "heads × head dim × 2 × bytes per token, and its logits), in GiB: fewer rows than "
        "batch_size when they would not fit; auto = 80% of the GPU memory free at the stage's "
        "start on CUDA, no bound on CPU. On CUDA an out-of-memory error halves the batch",
    )
    plant_junk: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="a filter-study aid: share of each round's samples replaced by junk, half "
        "θ₀'s sample of the prompt (stale), half the sample's first line looped to "
        "max_new_tokens (loop), the same rows for the same seed (samples.source junk-stale / "
        "junk-loop; scored, filtered and trained like the student's); 0 = none",
    )


class ScoreConfig(Section):
    backend: Literal["hf", "vllm", "auto"] | None = Field(
        None, description="scoring engine (teacher and student); none = generate.backend"
    )
    top_k: int = Field(16, ge=1, le=1024, description="teacher log-probs kept per position")
    batch_tokens: int = Field(
        16384, ge=64, description="tokens per packed scoring forward, at most (see memory_gb)"
    )
    memory_gb: MemoryGB = Field(
        "auto",
        description="device memory a scoring forward's activations may fill, in GiB (also the "
        "teacher's scoring in evaluation): fewer tokens than batch_tokens when they would not "
        "fit; auto and out-of-memory errors as generate.memory_gb",
    )
    attention: Attention = Field(
        "auto",
        description="packed attention of the hf scoring forwards: auto = sdpa_varlen on CPU "
        "(per sequence, so a sample's scores do not depend on orchestration.shards), elsewhere "
        "the kernels of train.attention, timed on each scored model",
    )


class FilterConfig(Section):
    rule: Literal["band", "fence", "upper", "lower", "none", "random"] = Field(
        "none",
        description="rule on filter.score: none (keep every well-formed sample; the default, "
        "since no rule beat it in the filter study: docs/results), band (quantiles), fence "
        "(median ± k·MAD), upper / lower (one tail of the band), random (keep filter.keep of "
        "the well-formed samples uniformly at random, seeded by run seed and round; reads no "
        "score: the filter study's control)",
    )
    score: Literal["delta_ifd", "conditional", "teacher_nll", "learner_ratio"] = Field(
        "delta_ifd",
        description="what the rule reads, and its bad tail: delta_ifd (IFD_teacher − "
        "IFD_student; high), conditional (mean NLL_teacher(y|x) − mean NLL_generator(y|x), no "
        "prompt-less views; high), teacher_nll (the teacher's mean NLL of the response; high), "
        "learner_ratio (mean per-token log p_learner − log p_generator, the sample's staleness; "
        "both tails; applied by the train step over each step's samples: beyond the rule's "
        "bounds a sample weighs 0 in that step, recorded in the store's step_weights)",
    )
    ifd_form: Literal["log_ratio", "ratio"] = Field(
        "log_ratio",
        description="delta_ifd: log IFD = mean NLL(y|x) − mean NLL(y), or Cherry-LLM's ratio "
        "IFD = mean NLL(y|x) ÷ mean NLL(y)",
    )
    ratio_clip: float | None = Field(
        None,
        gt=0.0,
        description="learner_ratio: weight a kept sample min(ratio_clip, exp(ratio)) "
        "(V-trace-style truncation); none = weight 1",
    )
    q_low: float = Field(0.05, ge=0.0, le=1.0, description="band/lower: lower quantile kept")
    q_high: float = Field(0.90, ge=0.0, le=1.0, description="band/upper: upper quantile kept")
    abs_low: float | None = Field(
        None, description="absolute lower bound of filter.score (overrides q_low)"
    )
    abs_high: float | None = Field(
        None, description="absolute upper bound of filter.score (overrides q_high)"
    )
    k: float = Field(3.0, gt=0.0, le=100.0, description="fence: MADs (×1.4826) from the median")
    sides: Literal["both", "low", "high"] = Field("both", description="fence: sides that drop")
    keep: float = Field(
        1.0, ge=0.0, le=1.0, description="random: share of the well-formed samples kept a round"
    )
    keep_by_round: dict[int, float] | None = Field(
        None,
        description="random: share kept in the rounds listed (round → share in [0, 1]); "
        "other rounds keep filter.keep",
    )
    drop_unfinished: bool = Field(
        False, description="drop samples truncated without EOS (default: train on them)"
    )
    compute_delta_ifd: bool = Field(
        False,
        description="score the prompt-less views, Δ-IFD and the student's KL even when the "
        "rule needs none (analysis)",
    )
    view: Literal["bos", "eos", "prompt"] = Field(
        "eos",
        description="what precedes a response scored without its prompt: the BOS token, the "
        "EOS token (Δ-IFD tracks the KL best with it: docs/results), or view_text "
        "formatted as a prompt (chat template when present)",
    )
    view_text: str = Field("", description="view: prompt: its text ('' = an empty user turn)")

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        """Configs written before ``rule`` existed (``npd retry`` and schedules reload them)."""
        if not isinstance(data, dict) or "rule" in data:
            return data
        data = dict(data)
        if "enabled" in data:
            enabled = data.pop("enabled")
            data["rule"] = "band" if enabled else "none"
            deprecated(f"filter.enabled: {enabled} is now filter.rule: {data['rule']}")
        elif any(k in data for k in ("q_low", "q_high", "abs_low", "abs_high")):
            data["rule"] = "band"
            deprecated("filter quantiles without filter.rule: read as filter.rule: band")
        return data

    @model_validator(mode="after")
    def _band(self) -> FilterConfig:
        if self.q_low >= self.q_high:
            raise ValueError(f"q_low ({self.q_low}) must be < q_high ({self.q_high})")
        if self.abs_low is not None and self.abs_high is not None and self.abs_low >= self.abs_high:
            raise ValueError(f"abs_low ({self.abs_low}) must be < abs_high ({self.abs_high})")
        bad = {r: f for r, f in (self.keep_by_round or {}).items() if not 0 <= f <= 1}
        if bad:
            raise ValueError(f"keep_by_round {bad}: every share must be in [0, 1]")
        return self

    @property
    def reads_score(self) -> bool:
        """Whether the rule reads ``filter.score`` (``none`` and ``random`` read none)."""
        return self.rule not in ("none", "random")

    @property
    def weighs_steps(self) -> bool:
        """Whether the train step weighs its samples (a rule on ``learner_ratio``), which then
        reads the generator's per-token log-probs."""
        return self.reads_score and self.score == "learner_ratio"

    @property
    def needs_views(self) -> bool:
        """Whether scoring computes the prompt-less views and the student's scores."""
        return (self.reads_score and self.score == "delta_ifd") or self.compute_delta_ifd

    def keep_at(self, r: int) -> float:
        """The share the ``random`` rule keeps in round ``r``."""
        return (self.keep_by_round or {}).get(r, self.keep)


class PackConfig(Section):
    max_seq_len: int = Field(256, ge=8, le=1_048_576, description="tokens per packed row")
    mode: Literal["bfd", "greedy"] = Field("bfd", description="best-fit-decreasing or streaming")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="sample > max_seq_len")
