"""What every ``npd`` command shares: the ``--debug`` switch, the environment Prefect and MLflow
read at import, and strict JSON for ``--json`` (``finite``, from npd_core). It imports nothing
else of the project, so the CLI, the bench and the flows all import it without importing each
other."""

from __future__ import annotations

import os
from pathlib import Path

from npd_core.jsonsafe import finite

__all__ = ["DEBUG", "finite", "prefect_env"]

DEBUG = {"on": False}  # set by ``npd --debug`` (flows.cli)


def prefect_env(out: Path) -> None:
    """Settings Prefect reads at import: results under the output dir, offline, and its console
    handler quiet (our progress bars and one-line errors are the console; every log still goes
    to the Prefect API and shows in the UI). ``--debug`` lets Prefect's console through."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a first ephemeral API migrates a fresh database: 13 s on an idle 2-core box, more than
    # Prefect's 20 s limit when the box is busy ("Timed out … ephemeral Prefect API server")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(out.resolve() / "prefect-results")
    if not DEBUG["on"]:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not DEBUG["on"]:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "creating tables" chatter
