"""``npd serve``: npd's deployments served from one process (Prefect's ``serve``), for users
without a worker fleet. Runs start on the cron schedule, and runs started or retried from the
Prefect UI are picked up while the process lives. ``deployments/prefect.yaml`` holds the same
nightly deployment for ``prefect deploy`` and workers.
"""

from __future__ import annotations

from pathlib import Path

from prefect.deployments.runner import RunnerDeployment

from flows.distill import scheduled_flow


def deployments(
    config: Path | None, out: Path, cron: str, name: str = "nightly"
) -> list[RunnerDeployment]:
    """What ``npd serve`` serves: the scheduled distill flow on ``cron`` with a config path.

    The baseline flows (flows/baselines.py) take a RunSpec and checkpoint times, and the bench
    is a CLI over them; neither has a config-path entry point to schedule yet. When one does,
    its ``to_deployment(...)`` joins this list (and a matching entry joins prefect.yaml)."""
    params = {"config": str(config.resolve()) if config else None, "out": str(out.resolve())}
    return [
        scheduled_flow.to_deployment(
            name=name,
            cron=cron,
            parameters=params,
            description="One NPD run per schedule tick, continuing from the best checkpoint "
            "of this deployment's last completed run.",
        )
    ]
