"""Where the store's runs stand (``npd status``): each run with its rounds, a score per eval set,
its best checkpoint, the rounds whose weights were pruned and those that regressed. Read-only
SQL over the views, so it works on a store that a run is writing; a run whose process was
killed shows as 'crashed', one that failed as 'failed' (from its lease)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from npd_core.errors import StoreUsageError
from npd_core.store import lease
from npd_core.store.lineage import has_weights
from npd_core.store.store import Store, query

RUNS_SQL = """
SELECT run_id, name, status, start_score, final_score, created_at, finished_at, flow_run_id,
       mlflow_run_id
FROM runs ORDER BY created_at
"""
ROUNDS_SQL = """
SELECT c.run_id, c.round, c.path, c.eval_set, c.score, r.kept_fraction, r.mean_loss,
       r.stage_seconds_json, c.is_best, c.best_before, c.regressed
FROM checkpoints AS c LEFT JOIN rounds AS r ON r.run_id = c.run_id AND r.round = c.round
ORDER BY c.run_id, c.round
"""
EVALS_SQL = "SELECT run_id, round, eval_set, score FROM evals ORDER BY run_id, round"


def run_statuses(root: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """Every run of the store (or only ``run_id``; unknown: a one-line usage error), oldest
    first: its ``runs`` columns with the status to show, and ``rounds`` (each with ``scores``
    per eval set, ``weights``: still on disk, and the regression flags), ``best_round`` and
    ``regressed_rounds``. Plain rows: ``npd status --json`` prints them as they are. A store
    of an older npd gets the current views first."""
    db = Store(root, create=False).db_path
    runs = query(db, RUNS_SQL).to_pylist()
    if run_id is not None:
        runs = [r for r in runs if r["run_id"] == run_id]
        if not runs:
            raise StoreUsageError(
                f"{db}: no run {run_id!r}; `npd status --out {root}` lists the runs"
            )
    rounds = query(db, ROUNDS_SQL).to_pylist()
    scores: dict[tuple[str, int], dict[str, float]] = {}
    for e in query(db, EVALS_SQL).to_pylist():
        scores.setdefault((e["run_id"], e["round"]), {})[e["eval_set"]] = e["score"]
    for r in runs:
        r["status"] = lease.run_status(root, r["run_id"], r["status"])  # killed: 'crashed'
        r["rounds"] = [x for x in rounds if x["run_id"] == r["run_id"]]
        for x in r["rounds"]:  # score is the primary set's (x["eval_set"]); scores every set's
            x["scores"] = scores.get((r["run_id"], x["round"]), {})
            x["weights"] = has_weights(Path(root).resolve() / x["path"])  # keep_checkpoints
        best = [x for x in r["rounds"] if x["is_best"]]
        r["best_round"] = best[0]["round"] if best else None
        r["regressed_rounds"] = [x["round"] for x in r["rounds"] if x["regressed"]]
    return runs
