"""Shared fixtures: one tiny toy world and one Prefect test server per session."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest  # noqa: E402

# a real `prefect server start`, served deployments, resume checks (tests/resume_checks.py)
pytest_plugins = ["resume_checks"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A toy world that builds in seconds (its models are poor: tests check the plumbing)."""
    from npd_core.toy.world import ToySpec, build_toy_world

    return build_toy_world(tmp_path_factory.mktemp("toy"), ToySpec.tiny(), log=lambda m: None)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One ephemeral Prefect API for the whole session (its first start takes ~10 s)."""
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("results"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
