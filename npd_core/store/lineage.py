"""What one run hands to the next: its best (or any evaluated) checkpoint, the last completed run
of a deployment, the prompt ids earlier runs generated from, and its steps per round. Read-only
SQL over the store's views, so it works on a store that another run is writing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npd_core.errors import StoreUsageError
from npd_core.store import MARKER_NAME, Store, query

RUN_EXISTS_SQL = "SELECT count(*) AS n FROM runs WHERE run_id = ?"
BEST_SQL = """
SELECT run_id, round, path, eval_set, metric, score FROM checkpoints WHERE run_id = ? AND is_best
"""
ROUND_SQL = """
SELECT run_id, round, path, eval_set, metric, score FROM checkpoints
WHERE run_id = ? AND round = ?
"""
ROUNDS_OF_RUN_SQL = "SELECT round FROM checkpoints WHERE run_id = ? ORDER BY round"
PATHS_OF_RUN_SQL = "SELECT round, path FROM checkpoints WHERE run_id = ? ORDER BY round"
LAST_COMPLETED_SQL = """
SELECT run_id FROM runs WHERE status = 'completed' AND deployment = ?
ORDER BY finished_at DESC, created_at DESC LIMIT 1
"""
USED_PROMPTS_SQL = "SELECT DISTINCT prompt_id FROM samples WHERE run_id <> ?"
STEPS_OF_RUN_SQL = "SELECT round, step FROM checkpoints WHERE run_id = ?"


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    round: int
    path: Path  # absolute
    eval_set: str | None  # the run's primary eval set, which ``score`` is on
    metric: str | None
    score: float | None


def _db(root: str | Path) -> Path:
    return Store(root, create=False).db_path


def checkpoint(root: str | Path, run_id: str, round: int | None = None) -> Checkpoint:
    """θ_round of ``run_id`` (round None: the run's best evaluated checkpoint); an unknown run
    or round is a one-line usage error that lists what exists."""
    db = _db(root)
    if not query(db, RUN_EXISTS_SQL, [run_id]).column("n")[0].as_py():
        raise StoreUsageError(f"{db}: no run {run_id!r}; `npd status --out {root}` lists the runs")
    if round is None:
        rows = query(db, BEST_SQL, [run_id]).to_pylist()
    else:
        rows = query(db, ROUND_SQL, [run_id, round]).to_pylist()
    if not rows:
        have = query(db, ROUNDS_OF_RUN_SQL, [run_id]).column("round").to_pylist()
        what = "no evaluated checkpoint" if round is None else f"no checkpoint of round {round}"
        raise StoreUsageError(
            f"{db}: run {run_id!r} has {what}; its checkpoints are rounds {have or 'none'}"
        )
    row = rows[0]
    path = Path(root).resolve() / row["path"]  # stored relative to root, or absolute
    if not has_weights(path):
        paths = query(db, PATHS_OF_RUN_SQL, [run_id]).to_pylist()
        kept = [x["round"] for x in paths if has_weights(Path(root).resolve() / x["path"])]
        raise StoreUsageError(
            f"{db}: run {run_id!r} round {row['round']}: its weights were deleted "
            f"(train.keep_checkpoints keeps the best and the last rounds); rounds with weights: "
            f"{kept or 'none'}"
        )
    return Checkpoint(run_id, row["round"], path, row["eval_set"], row["metric"], row["score"])


def has_weights(path: str | Path) -> bool:
    """Whether a checkpoint directory still holds its model: ``train.keep_checkpoints``
    deletes a pruned round's directory as a whole (``npd_core.pipeline.retention``)."""
    return (Path(path) / "config.json").is_file()


def last_best(root: str | Path, deployment: str) -> Checkpoint | None:
    """Best checkpoint of the deployment's most recently finished completed run, if any."""
    if not (Path(root) / MARKER_NAME).is_file():
        return None
    rows = query(_db(root), LAST_COMPLETED_SQL, [deployment]).to_pylist()
    return checkpoint(root, rows[0]["run_id"]) if rows else None


def used_prompt_ids(root: str | Path, except_run: str) -> set[str]:
    """Ids of the prompts other runs in this store sampled from (any round, any outcome)."""
    if not (Path(root) / MARKER_NAME).is_file():
        return set()
    return set(query(_db(root), USED_PROMPTS_SQL, [except_run]).column(0).to_pylist())


def steps_by_round(root: str | Path, run_id: str) -> dict[int, int]:
    """A run's optimizer steps at the end of each round so far (its checkpoints' steps)."""
    rows = query(_db(root), STEPS_OF_RUN_SQL, [run_id]).to_pylist()
    return {x["round"]: x["step"] for x in rows}
