"""``npd export --register``: a run's checkpoint as a new version of a model in the MLflow Model
Registry (the plain HF directory is written by ``npd_core.store.export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from npd_core.store import Store, query
from npd_core.store.export import provenance
from npd_core.store.lineage import checkpoint
from tasks import tracking

MLFLOW_RUN_SQL = "SELECT mlflow_run_id FROM runs WHERE run_id = ?"


def register_checkpoint(root: Path, run_id: str, round: int | None, name: str) -> dict[str, Any]:
    """Add θ_round of ``run_id`` (None: its best) to the MLflow Model Registry as a new version
    of ``name``, logged to the run's MLflow run; returns its provenance, name and version."""
    ck = checkpoint(root, run_id, round)
    db = Store(root, create=False).db_path
    (mlflow_run,) = query(db, MLFLOW_RUN_SQL, [run_id]).column(0).to_pylist()
    version = tracking.register_checkpoint(root, mlflow_run, name, ck)
    return {**provenance(ck, best=round is None), "model": name, "version": version}
