"""The store: Parquet tables per stage, DuckDB views over them, leases and lineage."""

from npd_core.store.store import (
    CHECKPOINT_DERIVED,
    MARKER_NAME,
    SCHEMA_VERSION,
    SCHEMAS,
    SCORE_COLUMNS,
    STAGES,
    VIEWS,
    Store,
    connect,
    empty_table,
    query,
    table_from_rows,
)

__all__ = [
    "CHECKPOINT_DERIVED",
    "MARKER_NAME",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "SCORE_COLUMNS",
    "STAGES",
    "Store",
    "VIEWS",
    "connect",
    "empty_table",
    "query",
    "table_from_rows",
]
