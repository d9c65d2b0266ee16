"""Prefect tasks of the baselines: one training segment per held-out checkpoint, and the MLflow
bookkeeping that ties a variant's run to the benchmark. Each is a decorator plus one call."""

from __future__ import annotations

from prefect import task

from npd_core.baselines import onpolicy, sft
from npd_core.pipeline.results import StageResult, eval_metrics
from npd_core.pipeline.spec import RunSpec
from tasks import tracking
from tasks.faults import enter_stage
from tasks.stages import STAGE


@task(name="sft-train", task_run_name="c{r}-sft-train", **STAGE)
def sft_train(
    spec: RunSpec,
    r: int,
    until_s: float,
    budget_s: float,
    clock0_s: float,
    upstream: dict | None,
    mlflow_run: str,
) -> dict:
    """θ_{r−1} → θ_r on the teacher's answers until the clock reaches ``until_s``."""
    enter_stage(spec, "train", r)
    res = sft.sft_segment(spec, r, until_s, budget_s, clock0_s)
    tracking.log_steps(spec.root, mlflow_run, res.metrics["log"])
    return res.to_dict()


@task(name="onpolicy-train", task_run_name="c{r}-onpolicy-train", **STAGE)
def onpolicy_train(
    spec: RunSpec,
    r: int,
    until_s: float,
    budget_s: float,
    prompts_per_step: int,
    upstream: dict | None,
    mlflow_run: str,
) -> dict:
    """θ_{r−1} → θ_r by on-policy steps until the clock reaches ``until_s``."""
    enter_stage(spec, "train", r)
    res = onpolicy.onpolicy_segment(spec, r, until_s, budget_s, prompts_per_step)
    tracking.log_steps(spec.root, mlflow_run, res.metrics["log"])
    return res.to_dict()


@task(name="record-checkpoint", task_run_name="c{r}-record")
def record_checkpoint(
    spec: RunSpec, r: int, segment: dict, evaluation: StageResult, mlflow_run: str
) -> None:
    """Checkpoint metrics on the run's MLflow run, at step = checkpoint index."""
    m = segment["metrics"]
    scores = StageResult.of(evaluation).metrics.per_set(spec.cfg.eval.primary_set)
    tracking.log_metrics(
        spec.root,
        mlflow_run,
        {
            **eval_metrics(scores),
            "wall_s": m["clock_s"],
            "optimizer_steps": m["step"],
            **m["counters"],
        },
        step=r,
    )


@task(name="nest-run", task_run_name="nest-run")
def nest_run(root: str, mlflow_run: str, parent: str) -> None:
    """Show ``mlflow_run`` under the benchmark's parent run (MLflow nests by this tag)."""
    tracking.client(root).set_tag(mlflow_run, "mlflow.parentRunId", parent)
