"""A hook through which the CLI shows progress bars for stages running inside Prefect tasks.

The CLI sets ``reporter``; tasks call ``bar(stage, round, total)`` to get an ``advance`` callback.
With no reporter (a deployment run, a test) the callbacks do nothing.
"""

from __future__ import annotations

from collections.abc import Callable

Reporter = Callable[[str, int, int], Callable[[int], None]]
reporter: Reporter | None = None


def bar(stage: str, r: int, total: int) -> Callable[[int], None] | None:
    return reporter(stage, r, total) if reporter else None
