"""Run-level tasks: open the run (store rows, MLflow parent run), record each round (and
publish it to the Prefect UI), report the run's results at its end, close it."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.runtime import flow_run

from npd_core.bench.plots import delta_ifd_histogram
from npd_core.data import read_prompts
from npd_core.pipeline.results import EvaluateMetrics, RoundStages, RoundSummary, StageResult
from npd_core.pipeline.spec import RunSpec
from npd_core.store import Store, table_from_rows
from npd_core.store.lineage import checkpoint
from tasks import artifacts, tracking


def _runs_row(spec: RunSpec, **kw: Any) -> dict[str, Any]:
    cfg = spec.cfg
    row = dict(
        run_id=spec.run_id,
        name=cfg.name,
        status="running",
        config_json=json.dumps(spec.config, sort_keys=True),
        config_hash=cfg.digest(),
        flow_run_id=str(flow_run.get_id() or ""),
        teacher=spec.teacher,
        student=spec.student,
        deployment=spec.deployment,
        parent_run_id=spec.parent_run_id,
        parent_round=spec.parent_round,
        created_at=datetime.now(UTC),
    )
    row.update(kw)
    return row


@task(name="open-run", task_run_name="open-run")
def open_run(spec: RunSpec) -> str:
    """Write the ``runs`` and ``prompts`` rows and create the MLflow parent run."""
    store = Store(spec.root)
    spec.save()
    mlf = tracking.start_run(spec.root, spec.run_id, spec.cfg.name, spec.config)
    sources = [("train", None, spec.train_prompts)]
    sources += [("eval", name, path) for name, path in spec.eval_sets().items()]
    prompts = [
        dict(
            run_id=spec.run_id,
            prompt_id=p.id,
            prompt=p.text,
            answer=p.answer,
            split=split,
            eval_set=name,
        )
        for split, name, path in sources
        for p in read_prompts(path)
    ]
    store.write_stage(spec.run_id, None, "run", {"prompts": table_from_rows("prompts", prompts)})
    store.write_run(_runs_row(spec, mlflow_run_id=mlf, mlflow_uri=tracking.tracking_uri(spec.root)))
    return mlf


@task(name="record-round", task_run_name="r{r}-record")
def record_round(
    spec: RunSpec, r: int, results: dict[str, StageResult | dict], mlflow_run: str
) -> RoundSummary:
    """The ``rounds`` row, round metrics and the Δ-IFD histogram (kept band marked)."""
    stages = RoundStages.of(results)
    primary = spec.cfg.eval.primary_set
    row = dict(
        run_id=spec.run_id,
        round=r,
        **stages.rounds_row(),
        stage_seconds_json=json.dumps(stages.seconds()),
        flow_run_id=str(flow_run.get_id() or ""),
        created_at=datetime.now(UTC),
    )
    store = spec.store
    store.write_stage(spec.run_id, r, "summary", {"rounds": table_from_rows("rounds", [row])})
    child = tracking.round_run(spec.root, mlflow_run, spec.run_id, r)
    metrics = stages.mlflow_metrics(primary)
    tracking.log_metrics(spec.root, child, metrics)
    tracking.log_metrics(
        spec.root, mlflow_run, {f"round_{k}": v for k, v in metrics.items()}, step=r
    )
    delta = store.read_stage(spec.run_id, r, "score", "scores").column("delta_ifd")
    if delta.null_count < len(delta):  # Δ-IFD computed this round
        flt = stages.filter.metrics
        with tempfile.TemporaryDirectory() as d:
            png = delta_ifd_histogram(
                delta.to_numpy(zero_copy_only=False),
                flt.band_low,
                flt.band_high,
                flt.rule,
                f"{spec.run_id} round {r}: Δ-IFD",
                Path(d) / f"delta_ifd_r{r}.png",
            )
            tracking.log_artifact(spec.root, child, png, "plots")
            tracking.log_artifact(spec.root, mlflow_run, png, "plots")
    summary = RoundSummary.of(r, stages, primary)
    url = tracking.run_url(spec.root, child, spec.cfg.mlflow.ui_url)
    artifacts.publish_round(spec.run_id, summary, primary, url)
    return summary


@task(name="report-run", task_run_name="report-run")
def report_run(
    spec: RunSpec,
    mlflow_run: str,
    start: EvaluateMetrics,
    rounds: list[RoundSummary],
    reused: list[tuple[str, int]],
) -> dict[str, str] | None:
    """At the run's end: register its best checkpoint when ``mlflow.register_best`` names a
    model (a new version per run), then publish the results as a markdown artifact. ``start``
    is θ_0's evaluation, per eval set; returns the registered ``{name, version}``, if any."""
    best = checkpoint(spec.root, spec.run_id)
    registered = None
    if name := spec.cfg.mlflow.register_best:
        version = tracking.register_checkpoint(spec.root, mlflow_run, name, best)
        registered = {"name": name, "version": version}
    markdown = artifacts.summary_markdown(
        spec.run_id,
        start,
        rounds,
        spec.cfg.eval.primary_set,
        best,
        reused,
        registered,
        tracking.run_url(spec.root, mlflow_run, spec.cfg.mlflow.ui_url),
    )
    artifacts.publish_summary(spec.run_id, markdown)
    return registered


@task(name="close-run", task_run_name="close-run")
def close_run(
    spec: RunSpec,
    mlflow_run: str,
    start_score: float,
    final_score: float,
    status: str = "completed",
) -> None:
    spec.store.write_run(
        _runs_row(
            spec,
            status=status,
            mlflow_run_id=mlflow_run,
            mlflow_uri=tracking.tracking_uri(spec.root),
            start_score=start_score,
            final_score=final_score,
            finished_at=datetime.now(UTC),
        )
    )
    tracking.log_metrics(
        spec.root, mlflow_run, {"start_score": start_score, "final_score": final_score}
    )
    tracking.end_run(spec.root, mlflow_run, "FINISHED" if status == "completed" else "FAILED")
