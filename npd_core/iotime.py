"""Seconds spent moving bytes (loading models, writing checkpoints, reading and writing Parquet),
recorded per stage: the bench's clocks leave them out, for NPD's stages as for the baselines'
segments, whose clocks start after their loads and stop before their checkpoint writes.

``recording()`` collects, in the current context (a stage's thread), the spans of every call to
a function decorated with ``@timed``; calls outside a recording cost a clock read and nothing else.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_spans: ContextVar[list[tuple[float, float]] | None] = ContextVar("npd_io_spans", default=None)


@contextmanager
def recording() -> Iterator[list[tuple[float, float]]]:
    """Collect the ``(start, end)`` wall times (``time.time``) of ``@timed`` calls in this
    context; nested calls are merged, so a span is never counted twice."""
    spans: list[tuple[float, float]] = []
    token = _spans.set(spans)
    try:
        yield spans
    finally:
        _spans.reset(token)
        spans[:] = merged(spans)


def timed(fn: F) -> F:
    """Record a call's span in the current ``recording()``, if any."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            spans = _spans.get()
            if spans is not None:
                spans.append((t0, time.time()))

    return wrapper  # type: ignore[return-value]


def extend(spans: list[tuple[float, float]]) -> None:
    """Add spans recorded in another process (a torchrun rank of the stage) to the current
    ``recording()``, if any: ``time.time`` is one clock for every process of the machine."""
    current = _spans.get()
    if current is not None:
        current.extend((s, e) for s, e in spans)


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``spans`` as sorted, disjoint spans."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
