"""The store: Parquet tables per stage, DuckDB views over them, leases and lineage.

schema.py is the data model (table schemas, view SQL); store.py writes and queries it.
"""

from npd_core.store.schema import (
    CHECKPOINT_DERIVED,
    SCHEMA_VERSION,
    SCHEMAS,
    SCORE_COLUMNS,
    STAGES,
    VIEWS,
    empty_table,
    table_from_rows,
)
from npd_core.store.store import MARKER_NAME, Shard, Store, connect, query

__all__ = [
    "CHECKPOINT_DERIVED",
    "MARKER_NAME",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "SCORE_COLUMNS",
    "Shard",
    "STAGES",
    "Store",
    "VIEWS",
    "connect",
    "empty_table",
    "query",
    "table_from_rows",
]
