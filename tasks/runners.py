"""Where the shard tasks of a sharded round run (``orchestration.task_runner``): on the flow's
own threads, or on a Ray cluster through prefect-ray's ``RayTaskRunner`` (the ray extra).

Only the shard tasks and their commits go to Ray: the learner's stages stay in the flow's
process, where its torchrun ranks live (``npd_core.pipeline.workers``). Each shard task asks Ray
for what one engine needs (:func:`shard_resources`), so K shards run on K workers, or K GPUs.
With no ``ray_address`` the runner starts a local cluster for the flow run and stops it at the
end; prefect-ray reuses a cluster this process already joined (``ray.init``) and leaves it up.
A failed round re-raises its stage's own error (:func:`raise_first_failure`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from prefect.client.orchestration import get_client
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner
from prefect.tasks import Task
from prefect.utilities.collections import visit_collection

from npd_core.backends.vllm import EngineOptions
from npd_core.config import OrchestrationConfig
from npd_core.pipeline.spec import RunSpec

# A local cluster without the dashboard (it starts seconds sooner; npd does not link it), whose
# workers' output stays in Ray's session logs: stdout is the JSON of `npd … --json`, and the
# stages report through Prefect.
LOCAL_CLUSTER = {"include_dashboard": False, "log_to_driver": False}


@contextmanager
def shard_runner(orch: OrchestrationConfig) -> Iterator[TaskRunner | None]:
    """The task runner of the shard tasks while the flow runs: None (the flow's own threads),
    or prefect-ray's runner on ``orch.ray_address`` or on a local cluster of its own."""
    if orch.task_runner != "ray":
        yield None
        return
    from prefect_ray import RayTaskRunner

    if orch.ray_address:
        runner = RayTaskRunner(address=orch.ray_address)
    else:
        runner = RayTaskRunner(init_kwargs=LOCAL_CLUSTER)
    with _api_for_workers(), runner:
        yield runner


@contextmanager
def _api_for_workers() -> Iterator[None]:
    """Ray workers are other processes: without a Prefect server configured (npd's ephemeral
    API), they report to the ephemeral server of this process, by its URL (a task's context
    carries its settings); otherwise each would start a server of its own."""
    if PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def submit(
    runner: TaskRunner | None,
    task: Task,
    wait_for: list[PrefectFuture] | None = None,
    **parameters: Any,
) -> PrefectFuture:
    """``task.submit`` on the flow's runner (``runner`` None), or on ``runner``. Futures of the
    flow's threads cannot travel to another process: they go as their final states (waited
    for here), which Prefect resolves as it resolves futures (an upstream that failed leaves
    the task NotReady)."""
    if runner is None:
        return task.submit(wait_for=wait_for, **parameters)
    return runner.submit(task, _portable(parameters), wait_for=_portable(wait_for))


def _portable(x: Any) -> Any:
    def settle(e: Any) -> Any:
        if isinstance(e, PrefectConcurrentFuture):  # a task of the flow's own threads
            e.wait()
            return e.state
        return e

    return visit_collection(x, visit_fn=settle, return_data=True)


def shard_resources(spec: RunSpec, runner: TaskRunner | None) -> Any:
    """Around the submission of shard tasks: on Ray, each asks for the stage's torch threads as
    CPUs (at most the cluster's) and, on a cluster with GPUs, for one engine's GPUs
    (tensor × data parallel size); on threads, nothing."""
    if runner is None:
        return nullcontext()
    import ray
    from prefect_ray.context import remote_options

    total = ray.cluster_resources()
    gpus = EngineOptions.of(spec.cfg).gpus if total.get("GPU", 0) > 0 else 0
    cpus = min(spec.stage_threads(), int(total.get("CPU", 1)))
    return remote_options(num_cpus=cpus, num_gpus=gpus)


def raise_first_failure(futures: list[PrefectFuture]) -> None:
    """Re-raise the stage's own error: tasks downstream of a failure stay Pending, and asking
    them for a result would only say so."""
    for f in futures:
        f.wait()
    for f in sorted(futures, key=lambda f: f.state.timestamp):
        if f.state.is_failed() or f.state.is_crashed():
            f.result()
