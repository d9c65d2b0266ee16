"""Atomic writes: a folder or file becomes visible whole, or not at all, even on a full disk.

Used by the store (one folder per stage) and by checkpoints (one folder per round), so that a
reader, a retry or a resume never finds half a write. The hidden temp and trash names match
:data:`LEFTOVER_RE`: globs skip them, and a sweep removes what a killed writer left.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from npd_core.crashpoints import pause_point
from npd_core.errors import disk_full

# Hidden temp/trash names left by a killed writer ('old' is what checkpoints used before).
LEFTOVER_RE = re.compile(r"^\..+\.(tmp|trash|old)-[0-9a-f]+$")


def _hidden(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex}"


def trash_name(final: Path) -> Path:
    """A hidden name beside ``final`` to rename it to before deleting it: readers' globs skip
    it and a sweep removes it when a kill interrupts the deletion."""
    return _hidden(final, "trash")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path, pause_at: str | None = None) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final``; when the block ends, make it ``final``
    (:func:`publish_dir`). On any error the temp folder is removed and ``final`` is as it was;
    an error from a full disk becomes one StoreError naming ``final``
    (see :func:`npd_core.errors.disk_full`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden(final, "tmp")
    try:
        tmp.mkdir()
        yield tmp
        publish_dir(tmp, final, pause_at)
    except BaseException as exc:
        full = disk_full(exc, final)  # before freeing the space
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise


def publish_dir(folder: Path, final: Path, pause_at: str | None = None) -> None:
    """Make the finished ``folder`` (a sibling of ``final``) become ``final`` in one rename.

    Every file in it and the folder itself are fsynced, the process stops at crash point
    ``pause_at`` (see :mod:`npd_core.crashpoints`), an existing ``final`` is moved to a hidden
    trash name, ``folder`` is renamed to ``final`` (the old one is put back if that fails), the
    trash is deleted and the parent fsynced, so the rename survives a power cut.
    """
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
    fsync_path(folder)
    if pause_at is not None:
        pause_point(pause_at)
    if final.exists():
        trash = _hidden(final, "trash")
        os.rename(final, trash)
        try:
            os.rename(folder, final)
        except BaseException:
            os.rename(trash, final)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(folder, final)
    fsync_path(final.parent)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a hidden temp path beside ``final``; when the block ends, fsync it and replace
    ``final`` with it in one rename (then fsync the parent). On any error the temp is removed
    and ``final`` is as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden(final, "tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
