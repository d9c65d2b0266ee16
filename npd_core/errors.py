"""User-facing errors. Each message is one line naming the file/field/value and what to do.

The CLI prints ``error: <message>`` and exits non-zero (2 for config/usage errors); anything else
that escapes is a bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class NPDError(Exception):
    """A problem the user can fix; ``exit_code`` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # one line, whatever a wrapped library message contained
        super().__init__(" ".join(str(message).split()))


class ConfigError(NPDError):
    """Bad config file, key or value."""

    exit_code = 2


class DataError(NPDError):
    """Bad prompts file or row."""

    exit_code = 2


class ModelError(NPDError):
    """Missing or unusable checkpoint/tokenizer."""

    exit_code = 2


class StoreError(NPDError):
    """The output directory or its DuckDB store cannot be used as asked."""


class StoreUsageError(StoreError):
    """The command names a store, run or query that cannot be used as given (a usage error:
    a folder that is not an npd store, an unknown run id, a refused or broken SQL query)."""

    exit_code = 2


class TrainingError(NPDError):
    """A round could not train (e.g. a non-finite loss); the last good checkpoint is kept."""


class WorkerError(NPDError):
    """Worker processes (the train stage's torchrun ranks) did not start, or one failed or died
    mid-job; the group was stopped."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message (or its type), for one-line errors that
    quote a library's multi-line message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# Below this many free bytes after a failed write, the disk counts as full (see disk_full).
_FULL_BELOW = 1 << 20


def disk_full(exc: BaseException, path: str | Path) -> StoreError | None:
    """The one-line error for a write to ``path`` that failed because its disk is full, else
    None. Python and Arrow set errno 28 and safetensors says "os error 28", but torch's zip
    writer only reports a short write, so for other errors the free space left decides."""
    path = Path(path)
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(exc)
    if not full and isinstance(exc, OSError | RuntimeError):
        probe = next((p for p in (path, *path.parents) if p.exists()), None)
        full = probe is not None and shutil.disk_usage(probe).free < _FULL_BELOW
    if not full:
        return None
    return StoreError(
        f"{path}: no space left on device; nothing of it was kept; free space on that disk "
        "(df -h shows it) and run the command again"
    )


class BackendError(NPDError):
    """The generation/scoring engine (vLLM) could not start or failed while running."""
