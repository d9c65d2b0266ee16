"""Scale-out: a round's producer chain (generate → score → filter → pack) and consumer chain
(train → evaluate) as flows of their own, deployed on separate work pools (GPU hosts for
generation, others for training) and started by the distill flow through ``run_deployment``
when ``orchestration.generate_pool``/``train_pool`` are set. See deployments/README.md.

Deployment names: ``npd-produce/<generate_pool>`` and ``npd-consume/<train_pool>``. Every host
must see the same output directory (Parquet shards, checkpoints, Prefect results) and the same
MLflow tracking URI; the stage tasks and their cache keys are the in-process ones, so a retried
run skips what any host finished.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from npd_core.pipeline.spec import RunSpec, generator_round
from tasks import run as run_tasks
from tasks import stages as t

PRODUCE = "npd-produce"
CONSUME = "npd-consume"
POLL_S = 2.0


class RemoteChainError(RuntimeError):
    """A producer/consumer flow run on a work pool did not complete."""


@flow(
    name=PRODUCE,
    flow_run_name="{spec.run_id}-r{r}-produce",
    persist_result=True,
    result_serializer="json",
    log_prints=True,
)
def produce_flow(spec: RunSpec, r: int, source: dict | None = None) -> dict[str, dict]:
    """D_r: generate → score → filter → pack; ``source`` is the train result of θ_{g(r)}."""
    gen = t.generate(spec, r, upstream=source)
    sc = t.score(spec, r, upstream=gen)
    fl = t.filter_(spec, r, upstream=sc)
    return {"generate": gen, "score": sc, "filter": fl, "pack": t.pack(spec, r, upstream=fl)}


@flow(
    name=CONSUME,
    flow_run_name="{spec.run_id}-r{r}-consume",
    persist_result=True,
    result_serializer="json",
    log_prints=True,
)
def consume_flow(
    spec: RunSpec, r: int, upstream: list[dict] | None = None, mlflow_run: str | None = None
) -> dict[str, dict]:
    """θ_{r−1} → θ_r on D_r, then the held-out score of θ_r (round 0: only evaluate θ_0)."""
    out: dict[str, dict] = {}
    if r > 0:
        out["train"] = t.train(spec, r, upstream=upstream, mlflow_run=mlflow_run)
    out["evaluate"] = t.evaluate(spec, r, upstream=out.get("train"))
    return out


def _launch(flow_name: str, pool: str, **parameters: Any) -> UUID:
    """Create the deployment's flow run (a subflow of this one) without waiting for it."""
    return run_deployment(f"{flow_name}/{pool}", parameters=parameters, timeout=0).id


def _result(flow_run_id: UUID) -> dict[str, dict]:
    """Wait for a launched chain; its return value comes from the shared result storage."""
    with get_client(sync_client=True) as client:
        while not (run := client.read_flow_run(flow_run_id)).state.is_final():
            time.sleep(POLL_S)
    if not run.state.is_completed():
        raise RemoteChainError(
            f"flow run {run.name} ({flow_run_id}) ended {run.state.name}: {run.state.message}"
        )
    return run.state.result()


def remote_rounds(spec: RunSpec, mlflow_run: str) -> tuple[list[dict], list[dict]]:
    """Every round through the two deployments; returns (all stage results, round summaries),
    as the in-process path does. Producing D_{r+1} runs while round r trains whenever
    staleness ≥ 1."""
    cfg, args = spec.cfg, dict(spec=asdict(spec))
    gen_pool, train_pool = cfg.orchestration.generate_pool, cfg.orchestration.train_pool
    consumed = {0: _launch(CONSUME, train_pool, **args, r=0)}
    produced = {1: _launch(PRODUCE, gen_pool, **args, r=1, source=None)}
    chains: dict[int, dict[str, dict]] = {}
    done: dict[int, dict[str, dict]] = {}
    summaries = []

    def finish(q: int) -> None:
        """Wait for consumer q and record round q."""
        done[q] = _result(consumed[q])
        if q > 0:
            stages = {**chains[q], **done[q]}
            summaries.append(run_tasks.record_round(spec, q, stages, mlflow_run))

    for r in range(1, cfg.rounds + 1):
        chains[r] = _result(produced[r])
        if r - 1 not in done:
            finish(r - 1)
        upstream = [chains[r]["pack"], *([done[r - 1]["train"]] if r > 1 else [])]
        consumed[r] = _launch(
            CONSUME, train_pool, **args, r=r, upstream=upstream, mlflow_run=mlflow_run
        )
        if r < cfg.rounds:
            g = generator_round(r + 1, cfg.staleness)
            if g == r:  # staleness 0: D_{r+1} needs θ_r
                finish(r)
            produced[r + 1] = _launch(
                PRODUCE, gen_pool, **args, r=r + 1, source=done[g].get("train")
            )
    if cfg.rounds not in done:
        finish(cfg.rounds)
    stage_results = [x for part in (*chains.values(), *done.values()) for x in part.values()]
    return stage_results, summaries
