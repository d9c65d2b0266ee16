"""One Prefect task per stage. Each is the decorator plus one call into
``npd_core.pipeline.stages``, then MLflow logging of what the stage produced.

Results are small typed ``StageResult``s (digests, seconds, metrics) persisted as JSON under the
output directory (one persisted as a dict by an older npd reads back too), and every task has
a cache key built from its inputs: run id, round, stage, config digest and the
digests of the upstream stages. A retried flow run therefore finds the stages that completed
as ``Cached`` and reruns from the one that failed.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext
from prefect.runtime import flow_run, task_run

from npd_core.config import config_digest
from npd_core.crashpoints import pause_point
from npd_core.pipeline import stages
from npd_core.pipeline.results import StageResult, digest_of
from npd_core.pipeline.spec import RunSpec
from npd_core.store import Shard
from tasks import progress, tracking
from tasks.faults import InjectedFault, enter_stage


def _prov() -> dict[str, str]:
    return {
        "flow_run_id": str(flow_run.get_id() or ""),
        "task_run_id": str(task_run.get_id() or ""),
    }


SUBKEYS = ("stage", "shard")  # parameters that tell apart the runs of one task in one round


def stage_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """run id / round / stage / config digest / upstream digests. The digest is of the config as
    stored with the run, so a run begun by an older npd resumes from its cache."""
    spec: RunSpec = parameters["spec"]
    up = parameters.get("upstream")
    ups = "-".join(digest_of(u) for u in (up if isinstance(up, list) else [up]) if u)
    digest = config_digest(spec.config)
    name = "-".join([context.task.name, *(str(parameters[k]) for k in SUBKEYS if k in parameters)])
    return f"{spec.run_id}/r{parameters['r']}/{name}/{digest}/{ups or 'root'}"


def not_injected(task: Any, task_run: Any, state: Any) -> bool:
    """Retry flaky failures, not the ones NPD_FAIL_AT injects (those rehearse a flow retry)."""
    return not isinstance(state.result(raise_on_failure=False), InjectedFault)


STAGE = dict(cache_key_fn=stage_key, persist_result=True, result_serializer="json")
FLAKY = dict(retries=1, retry_delay_seconds=1, retry_condition_fn=not_injected)


@task(name="generate", task_run_name="r{r}-generate", **FLAKY, **STAGE)
def generate(spec: RunSpec, r: int, upstream: StageResult | None = None) -> StageResult:
    """Student snapshot samples the round's prompts (flaky on real servers: one retry)."""
    enter_stage(spec, "generate", r)
    cfg = spec.cfg
    n = cfg.data.prompts_per_round * cfg.generate.n_per_prompt
    res = stages.generate_stage(spec, r, _prov(), progress.bar("generate", r, n))
    _log_engine(res)
    return res


@task(name="score", task_run_name="r{r}-score", **FLAKY, **STAGE)
def score(spec: RunSpec, r: int, upstream: StageResult) -> StageResult:
    enter_stage(spec, "score", r)
    views = 2 if spec.cfg.filter.needs_views else 1  # the teacher's sequences per sample
    total = StageResult.of(upstream).metrics.n_generated * views
    res = stages.score_stage(spec, r, _prov(), progress.bar("score", r, total))
    _log_engine(res)
    return res


@task(name="generate-shard", task_run_name="r{r}-generate-shard{shard}", **FLAKY, **STAGE)
def generate_shard(
    spec: RunSpec, r: int, shard: int, upstream: StageResult | None = None
) -> StageResult:
    """Shard ``shard`` of the round's prompts sampled (``orchestration.shards``), kept aside
    until ``commit`` makes the stage visible."""
    enter_stage(spec, f"generate-shard{shard}", r)
    part = Shard(shard, spec.cfg.orchestration.shards)
    res = stages.generate_stage(spec, r, _prov(), shard=part)
    _log_engine(res)
    return res


@task(name="score-shard", task_run_name="r{r}-score-shard{shard}", **FLAKY, **STAGE)
def score_shard(spec: RunSpec, r: int, shard: int, upstream: StageResult) -> StageResult:
    """Shard ``shard`` of the committed generate stage scored, kept aside until ``commit``."""
    enter_stage(spec, f"score-shard{shard}", r)
    part = Shard(shard, spec.cfg.orchestration.shards)
    res = stages.score_stage(spec, r, _prov(), shard=part)
    _log_engine(res)
    return res


@task(name="commit", task_run_name="r{r}-{stage}", **STAGE)
def commit(spec: RunSpec, r: int, stage: str, upstream: list[StageResult]) -> StageResult:
    """The sharded ``stage`` made visible once all its shards are in (its stage name in the
    UI: the sharded stage is done when this is)."""
    enter_stage(spec, stage, r)
    return stages.commit_stage(spec, r, stage, upstream)


def _log_engine(res: StageResult) -> None:
    """Say which engine ran the stage (``backend: auto`` decides at run time) and how long
    vLLM took to start or to load the round's snapshot."""
    m = asdict(res.metrics)
    times = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if "engine" in k and v)
    line = f"{res.stage} r{res.round}: backend {m['backend']}"
    get_run_logger().info(f"{line} ({times})" if times else line)


@task(name="filter", task_run_name="r{r}-filter", **STAGE)
def filter_(spec: RunSpec, r: int, upstream: StageResult) -> StageResult:
    enter_stage(spec, "filter", r)
    return stages.filter_stage(spec, r, _prov())


@task(name="pack", task_run_name="r{r}-pack", **STAGE)
def pack(spec: RunSpec, r: int, upstream: StageResult) -> StageResult:
    enter_stage(spec, "pack", r)
    return stages.pack_stage(spec, r, _prov())


@task(name="train", task_run_name="r{r}-train", **STAGE)
def train(spec: RunSpec, r: int, upstream: list[StageResult], mlflow_run: str) -> StageResult:
    """θ_{r−1} → θ_r; per-step loss/lr/tokens-per-s go to the round's MLflow run."""
    enter_stage(spec, "train", r)
    cfg = spec.cfg
    bar = progress.bar("train", r, cfg.train.steps_per_round)
    steps = itertools.count(1)

    def on_step(_: object) -> None:
        if bar:
            bar(1)
        pause_point(f"train:{r}:{next(steps)}")

    res = stages.train_stage(spec, r, _prov(), on_step=on_step)
    if s := res.metrics.ranks_start_s:
        get_run_logger().info(f"train r{r}: {res.metrics.ranks} learner ranks started in {s:.1f} s")
    child = tracking.round_run(spec.root, mlflow_run, spec.run_id, r)
    tracking.log_steps(spec.root, child, res.metrics.log)
    tracking.log_steps(spec.root, mlflow_run, res.metrics.log)
    if cfg.train.keep_checkpoints is None:  # else a copy of every round would defeat the pruning
        tracking.log_checkpoint(spec.root, child, spec.checkpoint(r), f"checkpoint/round={r}")
    return res


@task(name="evaluate", task_run_name="r{r}-evaluate", **STAGE)
def evaluate(spec: RunSpec, r: int, upstream: StageResult | dict | None = None) -> StageResult:
    """θ_r's score on every eval set (the sets are read once more to size the progress bar)."""
    enter_stage(spec, "evaluate", r)
    n = sum(len(ps) for ps in stages.eval_prompts(spec).values())
    res = stages.evaluate_stage(spec, r, _prov(), progress.bar("evaluate", r, n))
    if pruned := res.metrics.pruned_rounds:
        keep = spec.cfg.train.keep_checkpoints
        get_run_logger().info(
            f"evaluate r{r}: weights of rounds {pruned} deleted "
            f"(train.keep_checkpoints: {keep} and the best)"
        )
    return res
