"""Run configuration: one pydantic model per section; every field has a description and a range.

The CLI only fills this in. ``load_config`` turns any validation problem into one line that names
the file, the field and the fix; relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from npd_core.data import ANSWER_FIELD, HUB_NAME, ID_FIELD, PROMPT_FIELD
from npd_core.errors import ConfigError
from npd_core.method.answers import METRIC_NAMES, PYTHON_METRIC
from npd_core.threads import stage_threads


def deprecated(message: str) -> None:
    """One ``warning:`` line per message and process (old configs are reloaded by retries)."""
    warnings.warn(f"{message}; update the config", FutureWarning, stacklevel=2)


DEFAULT_EVAL_SET = "heldout"  # the one eval set of a run without eval.sets
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RAY_EXTRA = ("ray", "prefect_ray")  # orchestration.task_runner: ray


def _memory_gb(value: Any) -> Any:
    """A stage's ``memory_gb``: auto, or a positive number of GiB."""
    if value == "auto":
        return value
    gb = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if gb is None or not 0 < gb < float("inf"):
        raise ValueError("give a number of GiB > 0, or auto")
    return float(gb)


# a stage's memory budget (method.batching): GiB, or auto (most free GPU memory; none on CPU)
MemoryGB = Annotated[float | Literal["auto"], BeforeValidator(_memory_gb)]
# packed attention kernels (npd_core/method/attention.py), or auto: the device's fastest exact one
Attention = Literal["auto", "sdpa", "sdpa_varlen", "torch_varlen", "flex_document", "flash_varlen"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    rule: Literal["band", "fence", "upper", "lower", "none"] = Field(
        "none",
        description="Δ-IFD rule: none (keep every well-formed sample; the default, since no "
        "rule beat it in the filter study: README), band (quantiles), fence (median ± k·MAD), "
        "upper / lower (one tail of the band)",
    )
    q_low: float = Field(0.05, ge=0.0, le=1.0, description="band/lower: lower quantile kept")
    q_high: float = Field(0.90, ge=0.0, le=1.0, description="band/upper: upper quantile kept")
    abs_low: float | None = Field(None, description="absolute lower Δ-IFD bound (overrides q_low)")
    abs_high: float | None = Field(
        None, description="absolute upper Δ-IFD bound (overrides q_high)"
    )
    k: float = Field(3.0, gt=0.0, le=100.0, description="fence: MADs (×1.4826) from the median")
    sides: Literal["both", "low", "high"] = Field("both", description="fence: sides that drop")
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
        "EOS token (Δ-IFD tracks the KL best with it: README, filter study), or view_text "
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
        return self

    @property
    def needs_views(self) -> bool:
        """Whether scoring computes the prompt-less views and the student's scores."""
        return self.rule != "none" or self.compute_delta_ifd


class PackConfig(Section):
    max_seq_len: int = Field(256, ge=8, le=1_048_576, description="tokens per packed row")
    mode: Literal["bfd", "greedy"] = Field("bfd", description="best-fit-decreasing or streaming")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="sample > max_seq_len")


class TrainConfig(Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd", "ce"] = Field(
        "forward_kl",
        description="forward KL on teacher top-k (default), reverse KL, GKD JSD(β), "
        "or hard-label CE on the teacher's argmax",
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD β (0 = forward KL, 1 = reverse KL)")
    sft_weight: float = Field(0.0, ge=0.0, le=10.0, description="weight of CE on sampled tokens")
    rest_mass: bool = Field(
        False, description="forward KL: match the mass outside the teacher's top-k as one bin"
    )
    loss_chunk_tokens: int = Field(
        1024,
        ge=0,
        le=1_048_576,
        description="response positions whose logits exist at once in the loss, forward and "
        "backward (LM head applied chunk by chunk: memory ~ chunk × vocabulary); 0 = full logits",
    )
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="peak AdamW learning rate")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor ÷ peak")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps at the start of the run")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0.0, description="max global grad norm")
    steps_per_round: int = Field(150, ge=1, le=10_000_000, description="optimizer steps per round")
    epochs_per_round: float = Field(8.0, gt=0.0, le=100.0, description="passes over D_r at most")
    rows_per_step: int = Field(16, ge=1, description="packed rows per optimizer step")
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


class EvalConfig(Section):
    max_new_tokens: int | None = Field(None, ge=1, description="none = generate.max_new_tokens")
    batch_size: int = Field(
        512, ge=1, description="sequences decoded together (greedy), at most (see memory_gb)"
    )
    memory_gb: MemoryGB = Field(
        "auto",
        description="device memory a greedy decoding batch may fill, in GiB, as generate.memory_gb",
    )
    metric: str = Field(
        "exact",
        description="how a response is graded against the prompt's answer: exact (the whole "
        "response, spaces collapsed), normalized (also case and punctuation), contains, regex "
        "(eval.answer_regex), boxed (the last \\boxed{...}), gsm8k (the number after ####), "
        "final_line (its last non-empty line), or python:module:function (your own "
        "(prediction, reference) -> float, importable)",
    )
    answer_regex: str | None = Field(
        None,
        description="metric regex: the pattern whose first match's first group is the answer "
        "(in the response, and in the reference when it matches there)",
    )
    regression_margin: float = Field(
        3.0,
        ge=0.0,
        description="`npd status` flags a round scoring more than this below the best earlier "
        "round (score units: points)",
    )
    when: Literal["round", "end"] = Field(
        "round",
        description="round = evaluate θ_r as soon as it is trained (the next round's training "
        "waits for it); end = evaluate every checkpoint after the last round, so evaluation is "
        "never on the learner's path (npd bench; in-process rounds only)",
    )
    sets: dict[str, str] = Field(
        default_factory=dict,
        description="eval sets, name: path (any form data.prompts takes), each scored every "
        f"round; empty = one set, {DEFAULT_EVAL_SET!r}, from data.eval_prompts (or the toy world)",
    )
    primary: str | None = Field(
        None,
        description="the eval set whose score is each round's score and picks the best "
        "checkpoint (npd status, npd export, the next scheduled run's θ_0); none = the first "
        f"of eval.sets ({DEFAULT_EVAL_SET!r} without them)",
    )

    @model_validator(mode="before")
    @classmethod
    def _first_set_is_primary(cls, data: Any) -> Any:
        """Name the default primary set, so that a run's stored config says which it is."""
        if isinstance(data, dict) and data.get("sets") and data.get("primary") is None:
            data = {**data, "primary": next(iter(data["sets"]))}
        return data

    @field_validator("sets")
    @classmethod
    def _set_names(cls, sets: dict[str, str]) -> dict[str, str]:
        for name in sets:
            if not SET_NAME.fullmatch(name):
                raise ValueError(
                    f"set name {name!r}: use letters, digits, '_', '-' and '.' (it names "
                    "MLflow metrics and `npd status` columns)"
                )
        return sets

    @field_validator("primary")
    @classmethod
    def _primary_is_a_set(cls, primary: str | None, info: ValidationInfo) -> str | None:
        names = list(info.data.get("sets") or {DEFAULT_EVAL_SET: ""})
        if primary is not None and primary not in names:
            raise ValueError(f"{primary!r} names no eval set; name one of: {', '.join(names)}")
        return primary

    @property
    def primary_set(self) -> str:
        """The name of the set that decides (the default set's when it is the only one)."""
        return self.primary or DEFAULT_EVAL_SET

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in METRIC_NAMES and not PYTHON_METRIC.fullmatch(value):
            raise ValueError(
                f"unknown metric {value!r}; choose from {', '.join(METRIC_NAMES)} or "
                "python:module:function"
            )
        return value

    @model_validator(mode="after")
    def _regex(self) -> EvalConfig:
        if self.metric == "regex" and not self.answer_regex:
            raise ValueError("metric regex needs eval.answer_regex (a pattern with one group)")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as err:
                raise ValueError(
                    f"answer_regex {self.answer_regex!r} is not a regex ({err})"
                ) from None
        return self


class MlflowConfig(Section):
    register_best: str | None = Field(
        None,
        min_length=1,
        description="registered model name: each completed run adds its best checkpoint "
        "(eval.primary) to the MLflow Model Registry as a new version (a transformers model "
        "with its tokenizer, tagged with run id, round and score); none = no registry",
    )
    ui_url: str | None = Field(
        None,
        description="the MLflow UI that the links in Prefect's round artifacts open; none = the "
        "tracking URI when it is http(s), else http://127.0.0.1:5000 (npd ui's default)",
    )


class ScheduleConfig(Section):
    pin_student: bool = Field(
        False,
        description="scheduled runs start from models.student; false = from the best checkpoint "
        "of the deployment's last completed run (models.student only seeds the first)",
    )
    skip_used_prompts: bool = Field(
        False, description="drop train prompts whose id an earlier run in this --out generated from"
    )


class OrchestrationConfig(Section):
    task_runner: Literal["threads", "ray"] = Field(
        "threads",
        description="where the shard tasks of generate and score run: threads (the flow's "
        "process) or ray (prefect-ray's RayTaskRunner; the ray extra: pip install -e '.[ray]')",
    )
    ray_address: str | None = Field(
        None,
        min_length=1,
        description="Ray cluster of task_runner ray (ray://<head>:10001, or <head>:6379 from a "
        "cluster node); none = a local cluster started for the flow run and stopped at its end",
    )
    shards: int = Field(
        1,
        ge=1,
        le=4096,
        description="K: a round's prompts split into K shards, each generated and scored by a "
        "task of its own (K engines in parallel on Ray); same rows for any K",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM engines (GPU only): GPUs each engine splits a layer over"
    )
    data_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM engines (GPU only): model replicas inside each engine"
    )
    generate_pool: str | None = Field(
        None,
        description="work pool of deployment npd-produce/<pool> (generate → pack); "
        "none = in-process tasks",
    )
    train_pool: str | None = Field(
        None,
        description="work pool of deployment npd-consume/<pool> (train → evaluate); "
        "none = in-process tasks",
    )

    @model_validator(mode="after")
    def _both(self) -> OrchestrationConfig:
        if (self.generate_pool is None) != (self.train_pool is None):
            raise ValueError("set both generate_pool and train_pool, or neither")
        return self

    @model_validator(mode="after")
    def _ray_installed(self) -> OrchestrationConfig:
        if self.task_runner == "ray" and not all(map(importlib.util.find_spec, RAY_EXTRA)):
            raise ValueError(
                "task_runner 'ray' needs the ray extra (ray, prefect-ray), which is not "
                "installed; install it with pip install -e '.[ray]' or set task_runner: threads"
            )
        return self


class NPDConfig(Section):
    """The whole run. Rounds, staleness and seed at top level; one section per stage."""

    name: str = Field("npd", description="run name shown in Prefect and MLflow")
    rounds: int = Field(6, ge=1, le=100_000, description="distillation rounds")
    staleness: int = Field(1, ge=0, le=16, description="D_r generated by θ_{r−staleness}")
    overlap: bool = Field(True, description="run producing D_{r+1} while training on D_r")
    seed: int = Field(0, ge=0, description="seeds sampling, packing order and shuffles")
    threads: int = Field(0, ge=0, le=1024, description="torch threads per stage; 0 = auto")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _eval_at_end_in_process(self) -> NPDConfig:
        if self.eval.when == "end" and self.orchestration.generate_pool is not None:
            raise ValueError("eval.when: end runs in-process rounds only; unset the work pools")
        return self

    @model_validator(mode="after")
    def _shards_fit(self) -> NPDConfig:
        k, n = self.orchestration.shards, self.data.prompts_per_round
        if k > n:
            raise ValueError(
                f"orchestration.shards ({k}) exceeds data.prompts_per_round ({n}): a shard "
                f"would have no prompt; set shards to at most {n}"
            )
        if k > 1 and self.orchestration.generate_pool is not None:
            raise ValueError(
                "orchestration.shards > 1 runs in-process rounds only; unset the work pools or "
                "set shards: 1"
            )
        return self

    @model_validator(mode="after")
    def _one_source_of_eval_sets(self) -> NPDConfig:
        if self.eval.sets and self.data.eval_prompts:
            raise ValueError(
                "data.eval_prompts and eval.sets are both set; list the file under eval.sets "
                f"(e.g. {DEFAULT_EVAL_SET}: PATH) and remove data.eval_prompts"
            )
        return self

    def digest(self) -> str:
        """Short content hash of the resolved config (cache keys, provenance)."""
        return config_digest(self.model_dump(mode="json"))

    def stage_threads(self, concurrent: bool) -> int:
        """Threads for one stage: split the cores when two stages overlap."""
        return stage_threads(self.threads, concurrent)


def config_digest(dumped: dict[str, Any]) -> str:
    """The hash ``NPDConfig.digest`` gives, of a config as it was dumped when its run began: a
    retry by a newer npd (new fields, renamed ones) keys its stage cache as the run did."""
    blob = json.dumps(dumped, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


PATH_FIELDS = (
    ("models", "teacher"),
    ("models", "student"),
    ("data", "prompts"),
    ("data", "eval_prompts"),
)


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        ann = model.model_fields.get(str(part))
        if ann is None or not isinstance(ann.annotation, type):
            return []
        model = ann.annotation
    return list(model.model_fields)


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _field_names(NPDConfig, loc), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; remove it"
        return f"{source}: unknown key '{field}'{hint}"
    value = e.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: field '{field}': {e['msg']}{shown}; fix it in the config"


def build_config(
    data: dict[str, Any], source: str = "config", base: Path | None = None
) -> NPDConfig:
    """Validate a mapping into an ``NPDConfig``; relative paths resolve against ``base``."""
    try:
        cfg = NPDConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None
    for sec, key in PATH_FIELDS:
        section = getattr(cfg, sec)
        value = getattr(section, key)
        if value:
            setattr(section, key, _resolve(value, f"{sec}.{key}", source, base))
    cfg.eval.sets = {
        name: _resolve(value, f"eval.sets.{name}", source, base)
        for name, value in cfg.eval.sets.items()
    }
    return cfg


def _resolve(value: str, field: str, source: str, base: Path | None) -> str:
    """A path field's value made absolute against ``base`` (the config's folder)."""
    if "\0" in value:  # the OS refuses such a path with a bare ValueError
        raise ConfigError(f"{source}: field '{field}': path contains a NUL byte; fix it")
    if base is None or Path(value).expanduser().is_absolute():
        return value
    if not field.startswith("models.") and _remote(value, base):
        return value  # kept as written: read_prompts refuses it with a hint
    return str((base / value).resolve())


def _remote(value: str, base: Path) -> bool:
    """A URL, or a hub name (owner/name) that is no path next to the config."""
    return "://" in value or (
        HUB_NAME.fullmatch(value) is not None and not os.path.exists(base / value)
    )


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> NPDConfig:
    """Read YAML (or nothing, for the defaults), apply ``overrides`` (nested dict), validate."""
    data: dict[str, Any] = {}
    base = None
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; create one with `npd config init {p}`")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8 YAML") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{p}:{where} invalid YAML ({getattr(err, 'problem', err)})"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
        base = p.resolve().parent
    if overrides:
        data = merge(data, overrides)
    return build_config(data, source, base)


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` with ``b`` laid over it, section by section (nested dicts merge, other values of
    ``b`` replace ``a``'s): how overrides and bench variants change part of a config dump."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def commented_yaml(cfg: NPDConfig | None = None) -> str:
    """The config as YAML with each field's description as a comment (``npd config init``)."""
    cfg = cfg or NPDConfig()
    lines = ["# npd config: every key is optional; omitted keys take these defaults."]

    def emit(model: BaseModel, indent: int) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            pad = " " * indent
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(value, indent + 2)
                continue
            dumped = yaml.safe_dump(value, default_flow_style=True).strip()
            dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{name}: {dumped}  # {field.description}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"
