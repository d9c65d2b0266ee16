"""Shared fixtures: one tiny toy world and one Prefect test server per session."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# runs use the fixed packed-attention kernels, never a timed choice (npd_core/pipeline/kernels.py),
# so no test result depends on the load of the machine; subprocesses inherit it
os.environ.setdefault("NPD_ATTENTION", "fixed")

import pytest  # noqa: E402

# a real `prefect server start`, served deployments, resume checks (tests/resume_checks.py)
pytest_plugins = ["resume_checks"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A toy world that builds in seconds (its models are poor: tests check the plumbing).

    Built on one torch thread: with two on a busy 2-core box every tiny op waits at an OpenMP
    barrier for a descheduled thread (measured at load 4: 105 s with two threads, 33 s with one)."""
    import torch

    from npd_core.toy.world import ToySpec, build_toy_world

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_toy_world(tmp_path_factory.mktemp("toy"), ToySpec.tiny(), log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, prefect_api):
    """Flows run in this process report to the session's Prefect server (a real `prefect server
    start`, resume_checks.prefect_api), as under ``prefect_test_harness``, whose server of its own
    would first migrate a fresh database (a minute or more on a busy 2-core box)."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    results = tmp_path_factory.mktemp("results")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(results)
    updates = {PREFECT_API_URL: prefect_api.api, PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}
    # the global context too: for code in a context copied before this one (as the harness)
    with (
        temporary_settings(updates=updates),
        _temporary_global_settings_context(get_settings_context()),
    ):
        yield
        APILogWorker.drain_all()  # what the flows logged reaches the server before it stops
        EventsWorker.drain_all()
