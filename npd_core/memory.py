"""The peak resident memory (RSS) of this process during a span of work: what a run reports
per stage so that users can size machines.

On Linux the kernel keeps the process's high-water mark (``VmHWM`` in ``/proc/self/status``)
and, when ``5`` is written to ``/proc/self/clear_refs`` (Linux ≥ 4.0), resets it to the RSS of
the moment: a span resets it at its start and reads it at its end. Where it cannot be reset
(another system, or a kernel that refuses the write) the only figure is the peak over the
process's life so far (``getrusage``'s ``ru_maxrss``): an upper bound of the span's peak, and
``PeakRSS.lifetime`` says so.

Spans may overlap: the stages run in the flow's worker threads, and with ``staleness: 1`` a
round's generation runs beside the previous round's training. The mark is the process's, so
before one span resets it every open span folds the mark so far into its own peak. A span's
peak is thus the process's peak during that span, including what ran beside it. Memory of
other processes is not counted: vLLM's engines and ``train.nproc > 1``'s torchrun ranks run in
processes of their own, and a stage run on a Ray worker measures that worker.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import resource
except ImportError:  # Windows: no peak to read
    resource = None

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class PeakRSS:
    """One span's peak RSS in MiB, final when the span ends (``None`` where no figure exists)."""

    mib: float | None = None
    lifetime: bool = False  # the process's peak since it started, not the span's


_lock = threading.Lock()
_open: list[PeakRSS] = []  # the spans not yet ended, each holding its peak so far


def _mark_mib() -> float | None:
    """The process's high-water mark: since the last reset where the kernel keeps one."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.M)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) / 1024
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def _reset() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _fold(span: PeakRSS, mark: float | None) -> None:
    if mark is not None:
        span.mib = round(max(span.mib or 0.0, mark), 1)


@contextmanager
def peak_rss() -> Iterator[PeakRSS]:
    """``with peak_rss() as peak: work()``; then ``peak.mib`` is the process's peak RSS during
    the work, in MiB."""
    with _lock:
        mark = _mark_mib()
        for span in _open:
            _fold(span, mark)
        span = PeakRSS(lifetime=not _reset())
        _open.append(span)
    try:
        yield span
    finally:
        with _lock:
            _open.remove(span)
            _fold(span, _mark_mib())
