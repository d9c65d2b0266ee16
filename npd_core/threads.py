"""The torch thread count of a stage: one rule for runs, baselines and the bench's probe."""

from __future__ import annotations

import os


def stage_threads(configured: int, concurrent: bool) -> int:
    """Threads for one stage: ``configured`` when set (> 0); else all the cores, or half of them
    when two stages overlap (producing D_{r+1} beside training on D_r) so they do not fight."""
    if configured:
        return configured
    cores = os.cpu_count() or 1
    return max(1, cores // 2) if concurrent else cores
