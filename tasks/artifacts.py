"""Prefect artifacts of a run: a table per round and a markdown summary at its end, so that the
flow run's page in the Prefect UI shows results, not only task states. Called from tasks (the
artifacts belong to the flow run and to the task run that made them)."""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from npd_core.pipeline.results import EvaluateMetrics, RoundSummary
from npd_core.store.lineage import Checkpoint


def key(run_id: str, what: str) -> str:
    """The artifact key of ``what`` in run ``run_id`` (Prefect allows lowercase letters, digits
    and dashes); a retried round publishes a new version under the same key."""
    return re.sub(r"[^a-z0-9-]+", "-", f"npd-{run_id}-{what}".lower())


def _set_label(name: str, metric: str, primary: str) -> str:
    return f"score {name} ({metric}{', primary' if name == primary else ''})"


def round_rows(summary: RoundSummary, primary: str, mlflow_url: str) -> list[dict[str, Any]]:
    """One round's results as (result, value) rows: score per eval set, kept/generated, drop
    reasons, loss, tokens, stage seconds and the round's MLflow run."""
    rows = [
        (_set_label(name, summary.metrics[name], primary), round(v, 4))
        for name, v in summary.scores.items()
    ]
    rows.append(("kept / generated", f"{summary.n_kept} / {summary.n_generated}"))
    drops = summary.drop_reasons
    rows += [(f"dropped: {why}", n) for why, n in sorted(drops.items())] or [("dropped", 0)]
    rows += [
        ("mean loss", summary.mean_loss),
        ("train tokens", summary.train_tokens),
        ("teacher tokens", summary.teacher_tokens),
        ("generated tokens", summary.generated_tokens),
    ]
    rows += [(f"seconds {stage}", s) for stage, s in summary.stage_seconds.items()]
    rows.append(("MLflow run", mlflow_url))
    return [{"result": what, "value": value} for what, value in rows]


def publish_round(run_id: str, summary: RoundSummary, primary: str, mlflow_url: str) -> None:
    r = summary.round
    create_table_artifact(
        round_rows(summary, primary, mlflow_url),
        key=key(run_id, f"round-{r}"),
        description=f"npd run {run_id}, round {r}: [MLflow run]({mlflow_url})",
    )


def summary_markdown(
    run_id: str,
    start: EvaluateMetrics,
    rounds: list[RoundSummary],
    primary: str,
    best: Checkpoint,
    reused: list[tuple[str, int]],
    registered: dict[str, Any] | None,
    mlflow_url: str,
) -> str:
    """The run's results in markdown: the score of every round on every eval set, the best
    checkpoint, what came from an earlier process's cache and the registered version."""
    sets = list(start.scores)
    heads = [f"{n} (primary)" if n == primary else n for n in sets]
    lines = [
        f"# npd run {run_id}",
        "",
        f"{primary}: {start.score:.4g} → {rounds[-1].score:.4g}; best checkpoint: "
        f"round {best.round} ({best.score:.4g})",
        "",
        "| round | " + " | ".join(heads) + " | kept / generated | loss | seconds |",
        "|---:|" + "---:|" * len(sets) + "---:|---:|---:|",
        "| 0 | " + " | ".join(f"{start.scores[n]:.4g}" for n in sets) + " | | | |",
    ]
    for x in rounds:
        scores = " | ".join(f"{x.scores[n]:.4g}" for n in sets)
        lines.append(
            f"| {x.round} | {scores} | {x.n_kept} / {x.n_generated} | "
            f"{x.mean_loss:.4f} | {sum(x.stage_seconds.values()):.1f} |"
        )
    lines.append("")
    if reused:
        lines.append(f"Reused from an earlier process's cache: {reused_text(reused)}.")
    if registered:
        lines.append(
            f"Registered in the MLflow Model Registry: `{registered['name']}` version "
            f"{registered['version']}."
        )
    lines.append(f"[MLflow run]({mlflow_url})")
    return "\n".join(lines) + "\n"


def reused_text(reused: list[tuple[str, int]]) -> str:
    """``r1 generate score, r2 generate``: the stages an earlier process ran, by round."""
    by_round: dict[int, list[str]] = {}
    for stage, r in reused:
        by_round.setdefault(r, []).append(stage)
    return ", ".join(f"r{r} {' '.join(s)}" for r, s in sorted(by_round.items()))


def publish_summary(run_id: str, markdown: str) -> None:
    create_markdown_artifact(
        markdown, key=key(run_id, "summary"), description=f"npd run {run_id}: results"
    )
