"""One output directory: Parquet files (data plane) and DuckDB views over them (query plane).

Layout, relative to the output directory ``root``::

    npd-store.json                                   marker {"schema_version": 1, "project": "npd"}
    npd.duckdb                                       views only; nobody holds it open during a run
    .npd/empty/<table>.parquet                       one empty typed file per table (see below)
    runs/<run_id>/run/<table>.parquet                run-scoped tables: runs, prompts
    runs/<run_id>/round=<r>/<stage>/<table>.parquet  round-scoped stages (STAGES)

Why it looks like this:

- A stage becomes visible whole or not at all: it is written into a hidden sibling
  ``.<stage>.tmp-<uuid>`` and renamed into place, so a reader never sees half a stage.
- Files carry their own ``run_id`` and ``round`` columns. Views read with
  ``hive_partitioning = false``, so a folder name like ``round=0`` never overrides them.
- View paths are relative to ``root``, so the folder can move. DuckDB resolves relative paths
  against ``file_search_path`` (only there once it is set, not the working directory), which
  :func:`connect` sets to the database's folder. From the DuckDB CLI, ``cd`` into the folder first.
- A glob matching no file is an error in DuckDB, also inside a list of globs; ``allow_empty = true``
  lifts that, but an empty result then has no typed columns. So each view lists its hidden empty
  typed file first: it always matches and gives the view its columns and types from the start.
  Wildcards never match names starting with '.', so globs skip placeholders, temp and trash dirs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from npd_core.crashpoints import pause_point
from npd_core.errors import StoreError, StoreUsageError, disk_full

SCHEMA_VERSION = 2  # 2: derived best/regressed checkpoints, run lineage columns
MARKER_NAME = "npd-store.json"
DB_NAME = "npd.duckdb"
EMPTY_DIR = ".npd/empty"
RUN_SCOPE = "run"
STAGES = ("generate", "score", "filter", "pack", "train", "evaluate", "summary")

# --------------------------------------------------------------------------------------------
# Column schemas. Non-nullable fields are required by table_from_rows and write_stage.
# --------------------------------------------------------------------------------------------

_TS = pa.timestamp("us", tz="UTC")


def _req(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _opt(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


_RUN_ROUND = [_req("run_id", pa.string()), _req("round", pa.int32())]
_SAMPLE_KEY = [*_RUN_ROUND, _req("prompt_id", pa.string()), _req("sample_idx", pa.int32())]
_PROVENANCE = [
    _opt("flow_run_id", pa.string()),
    _opt("task_run_id", pa.string()),
    _req("created_at", _TS),
]

SAMPLES_SCHEMA = pa.schema(
    [
        *_SAMPLE_KEY,
        _req("prompt", pa.string()),
        _req("response", pa.string()),
        _req("prompt_token_ids", pa.list_(pa.int32())),
        _req("response_token_ids", pa.list_(pa.int32())),
        _req("generator_checkpoint", pa.string()),
        _req("backend", pa.string()),
        _req("temperature", pa.float32()),
        _req("top_p", pa.float32()),
        _opt("seed", pa.int64()),
        _opt("teacher", pa.string()),
        _req("prompt_tokens", pa.int32()),
        _req("response_tokens", pa.int32()),
        _req("finished", pa.bool_()),  # EOS seen
        _opt("sample_logprob_sum", pa.float32()),  # generator's log-prob of its sampled tokens
        *_PROVENANCE,
    ]
)

# Sums are over response tokens; "cond." = conditioned on the prompt, "resp" = response alone.
# ifd_* are log IFD (resp-only vs conditioned, per token); delta_ifd = ifd_student - ifd_teacher.
SCORE_COLUMNS = (
    "teacher_logprob_sum",
    "student_logprob_sum",
    "teacher_resp_logprob_sum",
    "student_resp_logprob_sum",
    "ifd_teacher",
    "ifd_student",
    "delta_ifd",
)
SCORES_SCHEMA = pa.schema(
    [
        *_SAMPLE_KEY,
        *(_req(name, pa.float32()) for name in SCORE_COLUMNS),
        _opt("topk_ids", pa.list_(pa.list_(pa.int32()))),  # (response_tokens, k)
        _opt("topk_logprobs", pa.list_(pa.list_(pa.float32()))),  # (response_tokens, k)
        *_PROVENANCE,
    ]
)

FILTER_SCHEMA = pa.schema(
    [
        *_SAMPLE_KEY,
        _req("kept", pa.bool_()),
        _opt("filter_reason", pa.string()),  # null when kept
        *_PROVENANCE,
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        _req("run_id", pa.string()),
        _opt("name", pa.string()),
        _req("status", pa.string()),
        _req("config_json", pa.string()),
        _req("config_hash", pa.string()),
        _opt("flow_run_id", pa.string()),
        _opt("mlflow_run_id", pa.string()),
        _opt("mlflow_uri", pa.string()),
        _opt("teacher", pa.string()),
        _opt("student", pa.string()),
        _opt("deployment", pa.string()),  # lineage of scheduled runs: "<flow>/<deployment>"
        _opt("parent_run_id", pa.string()),  # the run whose checkpoint is this run's θ_0
        _opt("parent_round", pa.int32()),
        _opt("start_score", pa.float64()),
        _opt("final_score", pa.float64()),
        _req("created_at", _TS),
        _opt("finished_at", _TS),
    ]
)

PROMPTS_SCHEMA = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("prompt_id", pa.string()),
        _req("prompt", pa.string()),
        _opt("answer", pa.string()),
        _req("split", pa.string()),  # 'train' | 'eval'
    ]
)

ROUNDS_SCHEMA = pa.schema(
    [
        *_RUN_ROUND,
        _req("n_generated", pa.int32()),
        _req("n_kept", pa.int32()),
        _opt("train_tokens", pa.int64()),
        _opt("mean_loss", pa.float64()),
        _opt("score", pa.float64()),
        _opt("kept_fraction", pa.float64()),
        _opt("delta_ifd_q05", pa.float64()),
        _opt("delta_ifd_q50", pa.float64()),
        _opt("delta_ifd_q95", pa.float64()),
        _opt("stage_seconds_json", pa.string()),
        _opt("flow_run_id", pa.string()),
        _req("created_at", _TS),
    ]
)

CHECKPOINTS_SCHEMA = pa.schema(
    [
        *_RUN_ROUND,
        _req("path", pa.string()),  # relative to the output directory
        _req("step", pa.int64()),
        _req("train_tokens", pa.int64()),
        _req("created_at", _TS),
    ]
)
# Columns the checkpoints view derives from evals and the run's config (never stored, so a later
# evaluation or a better round never rewrites a train shard).
CHECKPOINT_DERIVED = ("metric", "score", "best_before", "is_best", "regressed")

EVALS_SCHEMA = pa.schema(
    [
        *_RUN_ROUND,
        _req("checkpoint", pa.string()),
        _req("metric", pa.string()),
        _req("score", pa.float64()),
        _req("n", pa.int32()),
        _opt("flow_run_id", pa.string()),
        _req("created_at", _TS),
    ]
)

PACK_SCHEMA = pa.schema(
    [
        *_SAMPLE_KEY[:2],
        _req("row", pa.int32()),  # packed row index
        _req("slot", pa.int32()),  # position of the sample within its row
        *_SAMPLE_KEY[2:],
        _req("length", pa.int32()),  # tokens (prompt + response, after the overlong policy)
    ]
)

# Table name (= file stem) -> schema. Tables with these names are cast to them on write.
SCHEMAS: dict[str, pa.Schema] = {
    "samples": SAMPLES_SCHEMA,
    "scores": SCORES_SCHEMA,
    "filter": FILTER_SCHEMA,
    "runs": RUNS_SCHEMA,
    "prompts": PROMPTS_SCHEMA,
    "rounds": ROUNDS_SCHEMA,
    "checkpoints": CHECKPOINTS_SCHEMA,
    "evals": EVALS_SCHEMA,
    "pack": PACK_SCHEMA,
}
# Where each known table lives: a round-scoped stage, or RUN_SCOPE.
TABLE_STAGE: dict[str, str] = {
    "samples": "generate",
    "scores": "score",
    "filter": "filter",
    "runs": RUN_SCOPE,
    "prompts": RUN_SCOPE,
    "rounds": "summary",
    "checkpoints": "train",
    "evals": "evaluate",
    "pack": "pack",
}

# --------------------------------------------------------------------------------------------
# SQL. Paths are relative to the output directory (resolved through file_search_path).
# --------------------------------------------------------------------------------------------

SET_FILE_SEARCH_PATH_SQL = "SET file_search_path = ?"
SET_UTC_SQL = "SET TimeZone = 'UTC'"  # timestamps come back as timestamp[us, tz=UTC], as stored
SCHEMA_VERSION_SQL = "SELECT schema_version FROM store_meta"
LIST_VIEWS_SQL = "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name"
CHECKPOINT_SQL = "CHECKPOINT"

STORE_META_VIEW_SQL = f"""
CREATE OR REPLACE VIEW store_meta AS SELECT CAST({SCHEMA_VERSION} AS INTEGER) AS schema_version
"""
RUNS_VIEW_SQL = """
CREATE OR REPLACE VIEW runs AS
SELECT * FROM read_parquet(['.npd/empty/runs.parquet', 'runs/*/run/runs.parquet'],
                           hive_partitioning = false, allow_empty = true, union_by_name = true)
"""
PROMPTS_VIEW_SQL = """
CREATE OR REPLACE VIEW prompts AS
SELECT * FROM read_parquet(['.npd/empty/prompts.parquet', 'runs/*/run/prompts.parquet'],
                           hive_partitioning = false, allow_empty = true)
"""
ROUNDS_VIEW_SQL = """
CREATE OR REPLACE VIEW rounds AS
SELECT * FROM read_parquet(['.npd/empty/rounds.parquet', 'runs/*/round=*/summary/rounds.parquet'],
                           hive_partitioning = false, allow_empty = true)
"""
EVALS_VIEW_SQL = """
CREATE OR REPLACE VIEW evals AS
SELECT * FROM read_parquet(['.npd/empty/evals.parquet', 'runs/*/round=*/evaluate/evals.parquet'],
                           hive_partitioning = false, allow_empty = true)
"""
# Every evaluated checkpoint of a run, θ_0 (round 0, the run's starting student) included, with
# its score. is_best: the run's highest score (ties: the later round). best_before: the best
# score of the earlier rounds; regressed: more than the run's eval.regression_margin below it.
# union_by_name: shards of schema 1 still carry the score/is_best placeholders they had then.
CHECKPOINTS_VIEW_SQL = """
CREATE OR REPLACE VIEW checkpoints AS
WITH trained AS (
    SELECT run_id, round, path, step, train_tokens, created_at
    FROM read_parquet(['.npd/empty/checkpoints.parquet',
                       'runs/*/round=*/train/checkpoints.parquet'],
                      hive_partitioning = false, allow_empty = true, union_by_name = true)
), scored AS (
    SELECT coalesce(t.run_id, e.run_id) AS run_id, coalesce(t.round, e.round) AS round,
           coalesce(t.path, e.checkpoint) AS path, coalesce(t.step, 0) AS step,
           coalesce(t.train_tokens, 0) AS train_tokens,
           coalesce(t.created_at, e.created_at) AS created_at, e.metric, e.score
    FROM trained AS t FULL OUTER JOIN evals AS e ON t.run_id = e.run_id AND t.round = e.round
), ranked AS (
    SELECT *,
           max(score) OVER (PARTITION BY run_id ORDER BY round
                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS best_before,
           score IS NOT NULL AND row_number() OVER (
               PARTITION BY run_id ORDER BY score DESC NULLS LAST, round DESC) = 1 AS is_best
    FROM scored
)
SELECT k.*,
       k.score < k.best_before - TRY_CAST(
           json_extract_string(r.config_json, '$.eval.regression_margin') AS DOUBLE) AS regressed
FROM ranked AS k LEFT JOIN runs AS r ON r.run_id = k.run_id
"""
SCORES_VIEW_SQL = """
CREATE OR REPLACE VIEW scores AS
SELECT * FROM read_parquet(['.npd/empty/scores.parquet', 'runs/*/round=*/score/scores.parquet'],
                           hive_partitioning = false, allow_empty = true)
"""
SAMPLES_VIEW_SQL = """
CREATE OR REPLACE VIEW samples AS
SELECT g.*,
       s.teacher_logprob_sum, s.student_logprob_sum,
       s.teacher_resp_logprob_sum, s.student_resp_logprob_sum,
       s.ifd_teacher, s.ifd_student, s.delta_ifd,
       f.kept, f.filter_reason
FROM read_parquet(['.npd/empty/samples.parquet', 'runs/*/round=*/generate/samples.parquet'],
                  hive_partitioning = false, allow_empty = true) AS g
LEFT JOIN scores AS s
       ON s.run_id = g.run_id AND s.round = g.round
      AND s.prompt_id = g.prompt_id AND s.sample_idx = g.sample_idx
LEFT JOIN read_parquet(['.npd/empty/filter.parquet', 'runs/*/round=*/filter/filter.parquet'],
                       hive_partitioning = false, allow_empty = true) AS f
       ON f.run_id = g.run_id AND f.round = g.round
      AND f.prompt_id = g.prompt_id AND f.sample_idx = g.sample_idx
"""
FILTERED_VIEW_SQL = """
CREATE OR REPLACE VIEW filtered AS SELECT * FROM samples WHERE kept
"""
# In dependency order: scores before samples before filtered.
VIEW_SQL = (
    STORE_META_VIEW_SQL,
    RUNS_VIEW_SQL,
    PROMPTS_VIEW_SQL,
    ROUNDS_VIEW_SQL,
    EVALS_VIEW_SQL,
    CHECKPOINTS_VIEW_SQL,
    SCORES_VIEW_SQL,
    SAMPLES_VIEW_SQL,
    FILTERED_VIEW_SQL,
)
VIEWS = (
    "store_meta",
    "runs",
    "prompts",
    "rounds",
    "evals",
    "checkpoints",
    "scores",
    "samples",
    "filtered",
)  # the names VIEW_SQL creates, in the same order

# Statements `npd sql` runs; everything else (INSERT, CREATE, COPY, ATTACH, SET, ...) is refused.
READ_STATEMENTS = frozenset(
    {
        duckdb.StatementType.SELECT,
        duckdb.StatementType.EXPLAIN,
        duckdb.StatementType.PRAGMA,
        duckdb.StatementType.CALL,
    }
)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# temp/trash names of atomic writes (here and in models.save_checkpoint): hidden, never read
_LEFTOVER_RE = re.compile(r"^\..+\.(tmp|trash|old)-[0-9a-f]+$")
_PARQUET_COMPRESSION = "zstd"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _schema(name: str) -> pa.Schema:
    try:
        return SCHEMAS[name]
    except KeyError:
        known = ", ".join(SCHEMAS)
        raise StoreError(f"unknown table {name!r}; known tables: {known}") from None


def empty_table(name: str) -> pa.Table:
    """A zero-row table with the schema of ``name``: what a view shows before any run."""
    return _schema(name).empty_table()


def table_from_rows(name: str, rows: list[dict]) -> pa.Table:
    """Build table ``name`` from dict rows, so callers never spell Arrow types.

    Missing keys of nullable columns become null; unknown keys and missing required
    values raise StoreError naming the column.
    """
    schema = _schema(name)
    unknown = sorted({key for row in rows for key in row} - set(schema.names))
    if unknown:
        raise StoreError(
            f"table {name!r}: unknown column(s) {', '.join(unknown)}; "
            f"its columns are {', '.join(schema.names)}"
        )
    arrays = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            raise StoreError(
                f"table {name!r} column {field.name!r}: values do not fit {field.type} "
                f"({_first_line(exc)}); fix the values"
            ) from None
    return conform(name, pa.Table.from_arrays(arrays, names=schema.names))


def conform(name: str, table: pa.Table) -> pa.Table:
    """Cast ``table`` to the schema of ``name`` (columns reordered), so every file of a view agrees.

    Raises StoreError naming the column for missing/unknown columns, failed casts and nulls
    in required columns.
    """
    schema = _schema(name)
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise StoreError(
            f"table {name!r}: missing column(s) [{', '.join(missing)}], "
            f"unknown column(s) [{', '.join(extra)}]; match npd_core.store.SCHEMAS[{name!r}]"
        )
    columns = []
    for field in schema:
        column = table.column(field.name)
        try:
            column = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise StoreError(
                f"table {name!r} column {field.name!r}: cannot cast {column.type} to {field.type} "
                f"({_first_line(exc)}); fix the values or their type"
            ) from None
        if not field.nullable and column.null_count:
            raise StoreError(
                f"table {name!r} column {field.name!r}: {column.null_count} null value(s) in a "
                "required column; fill it in"
            )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


class Store:
    """The Parquet tables and DuckDB views of one output directory.

    Writers only write Parquet files; ``npd.duckdb`` is (re)written here, at open time, and only
    when it is missing or its recorded schema version differs. So no process holds the database
    during a run and any number of readers can query it.
    """

    def __init__(self, root: Path | str, create: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.db_path = self.root / DB_NAME
        self.marker_path = self.root / MARKER_NAME
        if self.root.exists() and not self.root.is_dir():
            raise StoreUsageError(
                f"{self.root} is a file, not a directory; choose an output directory"
            )
        if create:
            self._open_or_create()
        else:
            self._open_existing()

    # ---- opening ------------------------------------------------------------------------

    def _open_existing(self) -> None:
        if not self.marker_path.is_file():
            raise StoreUsageError(
                f"no npd store at {self.root} (missing {MARKER_NAME}); "
                "check the path or run `npd demo`/`npd run` first"
            )
        self._marker_version()
        if not self.db_path.is_file():
            raise StoreError(f"missing {self.db_path}; run `npd demo`/`npd run` to recreate it")
        self._db_version()

    def _open_or_create(self) -> None:
        try:
            self._create()
        except OSError as exc:  # read-only disk, no permission, a file on the path, full disk
            raise StoreError(
                f"cannot write to output directory {self.root} ({exc.strerror or exc}); "
                "choose a writable --out or fix its permissions"
            ) from None

    def _create(self) -> None:
        if self.marker_path.is_file():
            marker_version = self._marker_version()
        else:
            if self.root.is_dir() and any(self.root.iterdir()):
                raise StoreUsageError(
                    f"{self.root} is not an npd output directory (no {MARKER_NAME}) and is not "
                    "empty; choose an empty or npd output directory"
                )
            self.root.mkdir(parents=True, exist_ok=True)
            self._write_marker()  # first, so an interrupted create can be resumed
            marker_version = SCHEMA_VERSION
        tempfile.TemporaryFile(dir=self.root).close()  # writable? (an old store may not be)
        stale = self._db_version() != SCHEMA_VERSION
        self._write_placeholders(force=stale)
        if stale:
            self._write_views()
        if marker_version != SCHEMA_VERSION:
            self._write_marker()

    def _marker_version(self) -> int:
        try:
            marker = json.loads(self.marker_path.read_text())
            version = int(marker["schema_version"])
            project = marker["project"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"cannot read {self.marker_path} ({_first_line(exc)}); restore it or delete it "
                "if this folder holds only npd output"
            ) from None
        if project != "npd":
            raise StoreUsageError(f"{self.marker_path} names project {project!r}, not 'npd'")
        if version > SCHEMA_VERSION:
            raise _newer_error(self.marker_path, version)
        return version

    def _db_version(self) -> int | None:
        """The schema version recorded in npd.duckdb; None when missing or unreadable."""
        if not self.db_path.is_file():
            return None
        try:
            with duckdb.connect(str(self.db_path), read_only=True) as con:
                row = con.execute(SCHEMA_VERSION_SQL).fetchone()
        except duckdb.Error as exc:
            if _is_locked(exc):
                raise _locked_error(self.db_path, exc) from None
            return None  # only views live there, so rewriting it loses nothing
        version = int(row[0]) if row else None
        if version is not None and version > SCHEMA_VERSION:
            raise _newer_error(self.db_path, version)
        return version

    def _write_marker(self) -> None:
        marker = {"schema_version": SCHEMA_VERSION, "project": "npd"}
        _write_bytes_atomic(self.marker_path, (json.dumps(marker) + "\n").encode())

    def _write_placeholders(self, force: bool) -> None:
        for name in SCHEMAS:
            path = self.root / EMPTY_DIR / f"{name}.parquet"
            if force or not path.is_file():
                _write_parquet_atomic(path, empty_table(name))

    def _write_views(self) -> None:
        """Build the views in a temp file and swap it in, so open readers keep the old one."""
        tmp = self.root / f".{DB_NAME}.tmp-{uuid.uuid4().hex}"
        try:
            with duckdb.connect(str(tmp)) as con:
                con.execute(SET_FILE_SEARCH_PATH_SQL, [str(self.root)])
                for sql in VIEW_SQL:
                    con.execute(sql)
                con.execute(CHECKPOINT_SQL)
            _fsync_path(tmp)
            os.replace(tmp, self.db_path)
            _fsync_path(self.root)
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)

    # ---- paths ----------------------------------------------------------------------------

    def stage_path(self, run_id: str, round: int | None, stage: str) -> Path:
        """Folder of one stage: runs/<run_id>/round=<r>/<stage>, or runs/<run_id>/run."""
        _check_id("run_id", run_id)
        if round is None:
            if stage != RUN_SCOPE:
                raise StoreError(
                    f"stage {stage!r} needs a round; only {RUN_SCOPE!r} is written without one"
                )
            return self.root / "runs" / run_id / RUN_SCOPE
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise StoreError(f"round must be an int >= 0, got {round!r}")
        if stage not in STAGES:
            raise StoreError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.root / "runs" / run_id / f"round={round}" / stage

    def has_stage(self, run_id: str, round: int | None, stage: str) -> bool:
        """True once the stage is visible (it is renamed into place whole)."""
        return self.stage_path(run_id, round, stage).is_dir()

    # ---- writing --------------------------------------------------------------------------

    def write_stage(
        self, run_id: str, round: int | None, stage: str, tables: Mapping[str, pa.Table]
    ) -> Path:
        """Write ``tables`` as ``<name>.parquet`` and make the stage visible in one rename.

        A retried stage replaces the previous folder (moved aside to a hidden trash name, then
        deleted), so rewriting the same tables leaves the same bytes at the same names. On any
        error the temp folder is removed and the previous folder is untouched. Tables named in
        SCHEMAS are cast to their schema and must carry this run_id (and round).

        Run-scoped tables (``round=None``, stage ``'run'``) share one folder with the runs row,
        so there each file is replaced on its own instead of the whole folder.
        """
        final = self.stage_path(run_id, round, stage)
        prepared = {name: _prepare(name, table, run_id, round) for name, table in tables.items()}
        if round is None:
            for name, table in prepared.items():
                _write_parquet_atomic(final / f"{name}.parquet", table)
            return final

        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{stage}.tmp-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            for name, table in prepared.items():
                _write_parquet(tmp / f"{name}.parquet", table)
            _fsync_path(tmp)
            pause_point(f"write:{stage}:{round}")
            if final.exists():
                trash = final.parent / f".{stage}.trash-{uuid.uuid4().hex}"
                os.rename(final, trash)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(trash, final)
                    raise
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_path(final.parent)
        except BaseException as exc:
            full = disk_full(exc, final)  # before freeing the space
            shutil.rmtree(tmp, ignore_errors=True)
            if full is not None:
                raise full from None
            raise
        return final

    def write_run(self, row: dict) -> Path:
        """(Re)write the one-row runs table of ``row['run_id']`` (atomic file replace)."""
        run_id = row.get("run_id")
        if not isinstance(run_id, str):
            raise StoreError(f"runs row needs a string run_id, got {run_id!r}")
        folder = self.write_stage(run_id, None, RUN_SCOPE, {"runs": table_from_rows("runs", [row])})
        return folder / "runs.parquet"

    def sweep(self, run_id: str) -> list[Path]:
        """Remove the temp and trash folders that a killed writer left under ``runs/<run_id>``
        (hidden, so no reader ever saw them). Only while no other process writes the run."""
        _check_id("run_id", run_id)
        left = [p for p in (self.root / "runs" / run_id).rglob(".*") if _LEFTOVER_RE.match(p.name)]
        for p in left:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return left

    # ---- reading --------------------------------------------------------------------------

    def read_stage(self, run_id: str, round: int | None, stage: str, name: str) -> pa.Table:
        """One table of a written stage, as stored."""
        _check_id("table name", name)
        path = self.stage_path(run_id, round, stage) / f"{name}.parquet"
        if not path.is_file():
            raise StoreError(f"{path} does not exist; run stage {stage!r} first")
        return pq.read_table(path, partitioning=None)

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection whose relative view paths resolve inside this output directory."""
        return connect(self.db_path, read_only=read_only)

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        """Read-only SQL over the views; see :func:`query`."""
        return query(self.db_path, sql, params)


# --------------------------------------------------------------------------------------------
# Querying
# --------------------------------------------------------------------------------------------


def connect(db_path: Path | str, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open ``db_path`` with ``file_search_path`` set to its folder (where the view paths start).

    The session time zone is UTC, so timestamps read back exactly as written.

    Read-only by default: any number of read-only connections coexist, and npd never needs a
    writable one while a run writes Parquet.
    """
    db_path = Path(db_path)
    if not db_path.is_file():
        raise StoreUsageError(
            f"no npd database at {db_path}; check --db/--out or run `npd demo`/`npd run` first"
        )
    root = str(db_path.resolve().parent)
    if "," in root:
        raise StoreError(
            f"output directory {root} contains ',', which DuckDB's file_search_path cannot hold; "
            "rename or move it"
        )
    try:
        con = duckdb.connect(str(db_path), read_only=read_only)
    except duckdb.Error as exc:
        if _is_locked(exc):
            raise _locked_error(db_path, exc) from None
        raise StoreUsageError(
            f"{db_path}: DuckDB cannot open it ({_first_line(exc)}); give the npd.duckdb of an "
            "npd output directory"
        ) from None
    try:
        con.execute(SET_FILE_SEARCH_PATH_SQL, [root])
        con.execute(SET_UTC_SQL)
    except BaseException:
        con.close()
        raise
    return con


def query(db_path: Path | str, sql: str, params: list | None = None) -> pa.Table:
    """Run read-only SQL (SELECT, EXPLAIN, PRAGMA, CALL) over the views; errors are one line."""
    with connect(db_path, read_only=True) as con:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as exc:
            raise StoreUsageError(f"npd sql: {_condense(exc)}") from None
        if not statements:
            raise StoreUsageError("npd sql: empty query; try SELECT * FROM runs")
        for statement in statements:
            if statement.type not in READ_STATEMENTS:
                raise StoreUsageError(
                    f"npd sql is read-only: {statement.type.name} statements are refused; "
                    "use SELECT over the views"
                )
        try:
            return con.sql(sql, params=params).to_arrow_table()
        except duckdb.CatalogException as exc:
            message = _first_line(exc)
            if "does not exist" in message:
                views = ", ".join(row[0] for row in con.execute(LIST_VIEWS_SQL).fetchall())
                raise StoreUsageError(f"npd sql: {message} Views: {views}") from None
            raise StoreUsageError(f"npd sql: {_condense(exc)}") from None
        except duckdb.Error as exc:
            message = _condense(exc)
            if "read-only" in message:
                raise StoreUsageError(f"npd sql is read-only: {message}") from None
            raise StoreUsageError(f"npd sql: {message}") from None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _is_locked(exc: duckdb.Error) -> bool:
    return isinstance(exc, duckdb.IOException) and "Could not set lock" in str(exc)


def _locked_error(db_path: Path | str, exc: duckdb.Error) -> StoreError:
    """DuckDB lets one process write a database file, or many read it, never both."""
    holder = re.search(r"\(PID \d+\)", str(exc))
    return StoreError(
        f"{db_path} is locked by another program {holder.group(0) if holder else ''} that opened "
        "it for writing; close it (open the store read-only: duckdb -readonly, "
        "read_only=True) and run the command again"
    )


def _newer_error(path: Path, version: int) -> StoreError:
    return StoreError(
        f"{path} was written by a newer npd (store schema {version} > {SCHEMA_VERSION}); "
        "upgrade npd to read it"
    )


def _check_id(what: str, value: object) -> None:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise StoreError(
            f"{what} {value!r} is not a safe folder/file name; use letters, digits, '_', '-', "
            "'.' (not first), at most 128 characters"
        )


def _prepare(name: str, table: pa.Table, run_id: str, round: int | None) -> pa.Table:
    """Check one table before anything touches the disk."""
    _check_id("table name", name)
    if not isinstance(table, pa.Table):
        raise StoreError(f"table {name!r} must be a pyarrow.Table, got {type(table).__name__}")
    if name not in SCHEMAS:
        return table
    table = conform(name, table)
    expected = {"run_id": run_id} if round is None else {"run_id": run_id, "round": round}
    for column, value in expected.items():
        if column not in table.column_names:
            continue
        found = [v for v in table.column(column).unique().to_pylist() if v != value]
        if found:
            raise StoreError(
                f"table {name!r}: {column} value(s) {found[:3]} differ from the folder's "
                f"{column}={value!r}; write each run/round to its own stage"
            )
    return table


def _write_parquet(path: Path, table: pa.Table) -> None:
    """Write and fsync one Parquet file; same table in, same bytes out."""
    with open(path, "wb") as f:
        pq.write_table(table, f, compression=_PARQUET_COMPRESSION)
        f.flush()
        os.fsync(f.fileno())


def _write_parquet_atomic(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        _write_parquet(tmp, table)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _condense(exc: BaseException) -> str:
    """DuckDB's multi-line message as one line, without the caret/LINE context."""
    kept = []
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("LINE "):
            break
        if line:
            kept.append(line)
    return " ".join(kept) or type(exc).__name__
