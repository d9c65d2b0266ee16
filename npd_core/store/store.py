"""One output directory: Parquet files (data plane) and DuckDB views over them (query plane).

Layout, relative to the output directory ``root``::

    npd-store.json                                   marker {"schema_version": 1, "project": "npd"}
    npd.duckdb                                       views only; nobody holds it open during a run
    .npd/empty/<table>.parquet                       one empty typed file per table (see below)
    runs/<run_id>/run/<table>.parquet                run-scoped tables: runs, prompts
    runs/<run_id>/round=<r>/<stage>/<table>.parquet  round-scoped stages (STAGES)
    runs/<run_id>/round=<r>/<stage>/<table>-<k>-of-<K>.parquet   the same, written in K shards
    runs/<run_id>/round=<r>/.<stage>.shards/         shards of a stage not yet committed

Why it looks like this:

- A stage becomes visible whole or not at all: it is written into a hidden sibling
  ``.<stage>.tmp-<uuid>`` and renamed into place, so a reader never sees half a stage.
- A stage written by K tasks (``orchestration.shards``) collects their files in the hidden
  ``.<stage>.shards`` and is renamed into place once all K are in (``commit_shards``). That
  folder outlives a failed attempt (a sweep keeps it), so a retry reruns only missing shards.
- Files carry their own ``run_id`` and ``round`` columns. Views read with
  ``hive_partitioning = false``, so a folder name like ``round=0`` never overrides them.
- View paths are relative to ``root``, so the folder can move. DuckDB resolves relative paths
  against ``file_search_path`` (only there once it is set, not the working directory), which
  :func:`connect` sets to the database's folder. From the DuckDB CLI, ``cd`` into the folder first.
- A glob matching no file is an error in DuckDB, also inside a list of globs; ``allow_empty = true``
  lifts that, but an empty result then has no typed columns. So each view lists its hidden empty
  typed file first: it always matches and gives the view its columns and types from the start.
  Wildcards never match names starting with '.', so globs skip placeholders, temp and trash dirs.

- Every Parquet byte is read and written through one fsspec filesystem (``Store.fs``, from the
  output directory's path or URL), so the data plane's place is a configuration. Only
  filesystems that rename a folder atomically are accepted today (local, or a shared POSIX
  mount): object storage needs the manifest commit that docs/scale-out.md describes.

The tables' schemas and the views' SQL are in :mod:`npd_core.store.schema`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from npd_core.atomic import LEFTOVER_RE, atomic_dir, atomic_file, publish_dir
from npd_core.errors import StoreError, StoreUsageError, first_line
from npd_core.iotime import timed
from npd_core.store.schema import (
    SCHEMA_VERSION,
    SCHEMAS,
    STAGES,
    VIEW_SQL,
    conform,
    empty_table,
    table_from_rows,
)

MARKER_NAME = "npd-store.json"
DB_NAME = "npd.duckdb"
EMPTY_DIR = ".npd/empty"
RUN_SCOPE = "run"

# --------------------------------------------------------------------------------------------
# Connection SQL (the view SQL is in schema.py).
# --------------------------------------------------------------------------------------------

SET_FILE_SEARCH_PATH_SQL = "SET file_search_path = ?"
SET_UTC_SQL = "SET TimeZone = 'UTC'"  # timestamps come back as timestamp[us, tz=UTC], as stored
SCHEMA_VERSION_SQL = "SELECT schema_version FROM store_meta"
LIST_VIEWS_SQL = "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name"
CHECKPOINT_SQL = "CHECKPOINT"

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
_PARQUET_COMPRESSION = "zstd"


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


# npd.duckdb files this process found at the current schema version, as (path, inode, mtime,
# size): every stage opens the store, and a DuckDB connection to read the version costs ~20 ms.
# A rewritten file (another npd, an older or newer one) has another mtime and is read again.
_CURRENT: set[tuple[Path, int, int, int]] = set()


class Store:
    """The Parquet tables and DuckDB views of one output directory.

    Writers only write Parquet files; ``npd.duckdb`` is (re)written here, at open time, and only
    when it is missing or its recorded schema version differs. So no process holds the database
    during a run and any number of readers can query it. ``create=False`` opens an existing
    store only, and brings one of an older schema up to date as ``create=True`` does (its views
    and placeholders; the Parquet data stays as it was written).
    """

    def __init__(self, root: Path | str, create: bool = True) -> None:
        self.fs, path = fsspec.core.url_to_fs(str(root))
        if not isinstance(self.fs, LocalFileSystem):
            raise StoreUsageError(
                f"{root}: a stage becomes visible by a folder rename, which "
                f"{str(root).partition('://')[0]}:// storage cannot do, and the manifest commit it "
                "needs is not implemented (docs/scale-out.md); give a local or shared folder"
            )
        self.root = Path(path).resolve()
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
        if self._db_version() != SCHEMA_VERSION:  # an older npd's store: readers need new views
            self._open_or_create()

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
                f"cannot read {self.marker_path} ({first_line(exc)}); restore it or delete it "
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
        st = self.db_path.stat()
        seen = (self.db_path, st.st_ino, st.st_mtime_ns, st.st_size)
        if seen in _CURRENT:
            return SCHEMA_VERSION
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
        if version == SCHEMA_VERSION:
            _CURRENT.add(seen)
        return version

    def _write_marker(self) -> None:
        marker = {"schema_version": SCHEMA_VERSION, "project": "npd"}
        with atomic_file(self.marker_path) as tmp:
            tmp.write_text(json.dumps(marker) + "\n")

    def _write_placeholders(self, force: bool) -> None:
        for name in SCHEMAS:
            path = self.root / EMPTY_DIR / f"{name}.parquet"
            if force or not path.is_file():
                _write_parquet_atomic(self.fs, path, empty_table(name))

    def _write_views(self) -> None:
        """Build the views in a temp file and swap it in, so open readers keep the old one."""
        with atomic_file(self.db_path) as tmp:
            try:
                with duckdb.connect(str(tmp)) as con:
                    con.execute(SET_FILE_SEARCH_PATH_SQL, [str(self.root)])
                    for sql in VIEW_SQL:
                        con.execute(sql)
                    con.execute(CHECKPOINT_SQL)
            finally:
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
        return self.fs.isdir(self.stage_path(run_id, round, stage))

    # ---- writing --------------------------------------------------------------------------

    @timed
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
                _write_parquet_atomic(self.fs, final / f"{name}.parquet", table)
            return final

        with atomic_dir(final, pause_at=f"write:{stage}:{round}") as tmp:
            for name, table in prepared.items():
                _write_parquet(self.fs, tmp / f"{name}.parquet", table)
        return final

    def write_shard(
        self,
        run_id: str,
        round: int,
        stage: str,
        shard: Shard,
        tables: Mapping[str, pa.Table],
    ) -> Path:
        """Write shard ``shard`` of a stage's ``tables`` into its hidden shards folder, each
        file replaced whole (a retried shard rewrites the same name); nothing is visible until
        :meth:`commit_shards`."""
        folder = self._shards_path(run_id, round, stage)
        for name, table in tables.items():
            table = _prepare(name, table, run_id, round)
            _write_parquet_atomic(self.fs, folder / shard.file(name), table)
        return folder

    def commit_shards(
        self, run_id: str, round: int, stage: str, names: list[str], shards: int
    ) -> Path:
        """Make a stage written in ``shards`` shards visible in one rename, once every shard of
        every table in ``names`` is in; a stage already committed is left as it is (a retried
        commit after the rename)."""
        final = self.stage_path(run_id, round, stage)
        folder = self._shards_path(run_id, round, stage)
        files = [Shard(k, shards).file(name) for name in names for k in range(shards)]
        if not self.fs.isdir(folder) and all(self.fs.isfile(final / f) for f in files):
            return final
        missing = [f for f in files if not self.fs.isfile(folder / f)]
        if missing:
            raise StoreError(
                f"{folder}: shard file(s) {', '.join(missing[:3])} missing; rerun the stage's "
                "shard tasks (`npd retry`), which rewrite them"
            )
        publish_dir(folder, final, pause_at=f"write:{stage}:{round}")
        return final

    def _shards_path(self, run_id: str, round: int, stage: str) -> Path:
        final = self.stage_path(run_id, round, stage)
        return final.parent / f".{final.name}.shards"

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
        left = [p for p in (self.root / "runs" / run_id).rglob(".*") if LEFTOVER_RE.match(p.name)]
        for p in left:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return left

    # ---- reading --------------------------------------------------------------------------

    @timed
    def read_stage(
        self, run_id: str, round: int | None, stage: str, name: str, shard: Shard | None = None
    ) -> pa.Table:
        """One table of a written stage, as stored: its one file, or its shards in order
        (only ``shard``'s, when given)."""
        _check_id("table name", name)
        folder = self.stage_path(run_id, round, stage)
        path = folder / (shard.file(name) if shard else f"{name}.parquet")
        fs = self.fs
        if fs.isfile(path) or shard:
            paths = [str(path)]
        else:
            paths = sorted(fs.glob(str(folder / Shard.pattern(name))))
        if not paths or not fs.isfile(paths[0]):
            raise StoreError(f"{path} does not exist; run stage {stage!r} first")
        return pa.concat_tables([pq.read_table(p, partitioning=None, filesystem=fs) for p in paths])

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection whose relative view paths resolve inside this output directory."""
        return connect(self.db_path, read_only=read_only)

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        """Read-only SQL over the views; see :func:`query`."""
        return query(self.db_path, sql, params)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: which rows of a stage one task writes, and its file names."""

    index: int
    count: int

    def file(self, name: str) -> str:
        return f"{name}-{self.index:05d}-of-{self.count:05d}.parquet"

    @staticmethod
    def pattern(name: str) -> str:
        """Glob of every shard file of table ``name`` (sorted = shard order)."""
        return f"{name}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].parquet"

    def rows(self, n: int) -> slice:
        """This shard's contiguous part of ``n`` rows (sizes differ by at most one)."""
        return slice(self.index * n // self.count, (self.index + 1) * n // self.count)


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
            f"{db_path}: DuckDB cannot open it ({first_line(exc)}); give the npd.duckdb of an "
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
            message = first_line(exc)
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


def _write_parquet(fs: AbstractFileSystem, path: Path, table: pa.Table) -> None:
    """Write one Parquet file (the atomic writers fsync it); same table in, same bytes out."""
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression=_PARQUET_COMPRESSION)


def _write_parquet_atomic(fs: AbstractFileSystem, path: Path, table: pa.Table) -> None:
    with atomic_file(path) as tmp:
        _write_parquet(fs, tmp, table)


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
