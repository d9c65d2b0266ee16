"""Prefect task of the external peers (``npd bench --peers``): the peer's whole training run,
with its curve and settings logged to the variant's MLflow run."""

from __future__ import annotations

from prefect import task

from npd_core.data import read_prompts
from npd_core.pipeline.spec import RunSpec
from tasks import tracking


@task(name="trl-train", task_run_name="trl-train")
def trl_train(
    spec: RunSpec, prompts_per_step: int, budget_s: float, eval_at: list[float], mlflow_run: str
) -> dict:
    """TRL's DistillationTrainer on the run's world for ``budget_s`` training seconds."""
    from npd_core.baselines.peers.trl_peer import run_trl

    res = run_trl(
        spec.cfg,
        teacher=spec.teacher,
        student=spec.student,
        train_prompts=read_prompts(spec.train_prompts),
        eval_prompts=read_prompts(spec.eval_prompts),
        prompts_per_step=prompts_per_step,
        max_steps=None,
        budget_s=budget_s,
        eval_at=eval_at,
    )
    for k, point in enumerate(res.curve):
        tracking.log_metrics(spec.root, mlflow_run, point, step=k)
    tracking.client(spec.root).log_dict(mlflow_run, res.settings, "trl_settings.json")
    return res.to_dict()
