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

from npd_core.pipeline.plan import round_plan
from npd_core.pipeline.results import RoundSummary, StageResult
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
def produce_flow(
    spec: RunSpec, r: int, source: StageResult | None = None
) -> dict[str, StageResult]:
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
    spec: RunSpec,
    r: int,
    upstream: list[StageResult] | None = None,
    mlflow_run: str | None = None,
) -> dict[str, StageResult]:
    """θ_{r−1} → θ_r on D_r, then the held-out score of θ_r (round 0: only evaluate θ_0)."""
    out: dict[str, StageResult] = {}
    if r > 0:
        out["train"] = t.train(spec, r, upstream=upstream, mlflow_run=mlflow_run)
    out["evaluate"] = t.evaluate(spec, r, upstream=out.get("train"))
    return out


def _launch(flow_name: str, pool: str, **parameters: Any) -> UUID:
    """Create the deployment's flow run (a subflow of this one) without waiting for it."""
    return run_deployment(f"{flow_name}/{pool}", parameters=parameters, timeout=0).id


def _result(flow_run_id: UUID) -> dict[str, StageResult]:
    """Wait for a launched chain; its return value comes from the shared result storage."""
    with get_client(sync_client=True) as client:
        while not (run := client.read_flow_run(flow_run_id)).state.is_final():
            time.sleep(POLL_S)
    if not run.state.is_completed():
        raise RemoteChainError(
            f"flow run {run.name} ({flow_run_id}) ended {run.state.name}: {run.state.message}"
        )
    return run.state.result()


def remote_rounds(spec: RunSpec, mlflow_run: str) -> tuple[list[StageResult], list[RoundSummary]]:
    """Every round through the two deployments, launched in ``round_plan``'s order once what
    each needs has finished (a chain's results are its parameters); returns (all stage
    results, round summaries), as the in-process path does. Producing D_{r+1} runs while round
    r trains whenever staleness ≥ 1."""
    cfg, args = spec.cfg, dict(spec=asdict(spec))
    gen_pool, train_pool = cfg.orchestration.generate_pool, cfg.orchestration.train_pool
    launched: dict[tuple[str, int], UUID] = {}
    results: dict[tuple[str, int], dict[str, StageResult]] = {}
    summaries = []

    def result(chain: str, r: int) -> dict[str, StageResult]:
        if (chain, r) not in results:
            results[chain, r] = _result(launched[chain, r])
        return results[chain, r]

    for step, r in round_plan(cfg.rounds, cfg.staleness):
        if step == "produce":
            if r > 1:
                result(PRODUCE, r - 1)  # one producer at a time
            g = generator_round(r, cfg.staleness)
            source = result(CONSUME, g)["train"] if g else None
            launched[PRODUCE, r] = _launch(PRODUCE, gen_pool, **args, r=r, source=source)
        elif step == "train":
            before = result(CONSUME, r - 1)  # θ_{r−1} trained and evaluated
            upstream = [result(PRODUCE, r)["pack"], *([before["train"]] if r > 1 else [])]
            launched[CONSUME, r] = _launch(
                CONSUME, train_pool, **args, r=r, upstream=upstream, mlflow_run=mlflow_run
            )
        elif r == 0:
            launched[CONSUME, 0] = _launch(CONSUME, train_pool, **args, r=0)
        else:
            stages = {**result(PRODUCE, r), **result(CONSUME, r)}
            summaries.append(run_tasks.record_round(spec, r, stages, mlflow_run))
    return [x for part in results.values() for x in part.values()], summaries
