"""The sections around the rounds (evaluation, MLflow, schedules, orchestration) and the whole
run's config, ``NPDConfig``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from npd_core.config.base import DEFAULT_EVAL_SET, RAY_EXTRA, SET_NAME, MemoryGB, Section
from npd_core.config.stages import (
    DataConfig,
    FilterConfig,
    GenerateConfig,
    ModelsConfig,
    PackConfig,
    ScoreConfig,
)
from npd_core.config.train import TrainConfig
from npd_core.metric_names import METRIC_NAMES, PYTHON_METRIC
from npd_core.threads import stage_threads


def _known_metric(value: str) -> str:
    if value not in METRIC_NAMES and not PYTHON_METRIC.fullmatch(value):
        raise ValueError(
            f"unknown metric {value!r}; choose from {', '.join(METRIC_NAMES)} or "
            "python:module:function"
        )
    return value


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
        "final_line (its last non-empty line), lines (the fraction of the reference's lines "
        "matched in place), or python:module:function (your own "
        "(prediction, reference) -> float, importable)",
    )
    answer_regex: str | None = Field(
        None,
        description="metric regex: the pattern whose first match's first group is the answer "
        "(in the response, and in the reference when it matches there)",
    )
    also: list[str] = Field(
        default_factory=list,
        description="more metrics (names as eval.metric) graded on the same greedy answers of "
        "every set that has answers, each stored as a set of its own, '<set>.<metric>', beside "
        "the set's eval.metric score (the views world: exact, every line right)",
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
        return _known_metric(value)

    @field_validator("also")
    @classmethod
    def _known_metrics(cls, values: list[str]) -> list[str]:
        return [_known_metric(v) for v in values]

    @model_validator(mode="after")
    def _regex(self) -> EvalConfig:
        if "regex" in (self.metric, *self.also) and not self.answer_regex:
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
    def _step_weights_in_one_process(self) -> NPDConfig:
        if self.filter.weighs_steps and self.train.nproc > 1:
            raise ValueError(
                "filter.score learner_ratio weighs each step's samples in one learner process; "
                f"set train.nproc: 1 (is {self.train.nproc}) or choose another filter.score"
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
