"""``npd export``: one checkpoint of a run as a plain HF model directory (config, weights,
tokenizer), which ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load without npd,
and/or as a new version of a model in the MLflow Model Registry. No optimizer or RNG state goes
along; ``npd-export.json`` says where the weights came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from npd_core.atomic import atomic_dir
from npd_core.errors import StoreUsageError
from npd_core.store import Store, query
from npd_core.store.lineage import Checkpoint, checkpoint
from tasks import tracking

PROVENANCE = "npd-export.json"


def parse_round(value: str) -> int | None:
    """``best`` → None (the run's best evaluated checkpoint), else a round number ≥ 0."""
    if value == "best":
        return None
    if value.isdigit():
        return int(value)
    raise StoreUsageError(f"--round {value!r}: give 'best' or a round number (0 = θ_0)")


def export_checkpoint(root: Path, run_id: str, round: int | None, dest: Path) -> dict[str, Any]:
    """Write θ_round of ``run_id`` to ``dest`` (new or empty) in one rename; returns provenance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreUsageError(f"{dest}: exists and is not empty; give a new or empty directory")
    ck = checkpoint(root, run_id, round)
    info = _provenance(ck, best=round is None)
    with atomic_dir(dest) as tmp:
        AutoModelForCausalLM.from_pretrained(ck.path).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(ck.path).save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=1) + "\n")
    return {**info, "dir": str(dest.resolve())}


MLFLOW_RUN_SQL = "SELECT mlflow_run_id FROM runs WHERE run_id = ?"


def register_checkpoint(root: Path, run_id: str, round: int | None, name: str) -> dict[str, Any]:
    """Add θ_round of ``run_id`` (None: its best) to the MLflow Model Registry as a new version
    of ``name``, logged to the run's MLflow run; returns its provenance, name and version."""
    ck = checkpoint(root, run_id, round)
    db = Store(root, create=False).db_path
    (mlflow_run,) = query(db, MLFLOW_RUN_SQL, [run_id]).column(0).to_pylist()
    version = tracking.register_checkpoint(root, mlflow_run, name, ck)
    return {**_provenance(ck, best=round is None), "model": name, "version": version}


def _provenance(ck: Checkpoint, best: bool) -> dict[str, Any]:
    return dict(
        run_id=ck.run_id,
        round=ck.round,
        eval_set=ck.eval_set,
        metric=ck.metric,
        score=ck.score,
        source=str(ck.path),
        best=best,
    )
