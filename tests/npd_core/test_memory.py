"""Peak RSS over a span: a 200 MiB array shows in the span that held it and not in the next
one, an overlapping span's reset does not hide it from the span around it, and where the mark
cannot be reset the figure is the process's peak so far and says so."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from npd_core import memory
from npd_core.memory import peak_rss

MIB_200 = 200 * 2**20 // 8  # float64s in 200 MiB
LINUX = sys.platform.startswith("linux")


def _hold_200_mib() -> None:
    a = np.ones(MIB_200)  # written, so resident
    del a  # a large array is unmapped at once: the RSS falls back


@pytest.mark.skipif(not LINUX, reason="the resettable high-water mark is Linux's")
def test_a_span_sees_the_200_mib_it_held_and_the_next_span_does_not():
    with peak_rss() as big:
        _hold_200_mib()
    with peak_rss() as after:
        pass
    assert not big.lifetime and not after.lifetime
    assert big.mib - after.mib >= 190, (big, after)


@pytest.mark.skipif(not LINUX, reason="the resettable high-water mark is Linux's")
def test_an_overlapping_spans_reset_keeps_the_outer_spans_peak():
    """Stages overlap in the flow's threads: the inner span resets the process's mark, after
    the outer one held 200 MiB; the outer span still reports them."""
    with peak_rss() as outer:
        _hold_200_mib()
        with peak_rss() as inner:
            pass
    assert outer.mib - inner.mib >= 190, (outer, inner)


def test_without_a_reset_the_figure_is_the_peak_so_far(monkeypatch, tmp_path):
    """Where clear_refs cannot be written, or /proc does not exist (macOS: ``ru_maxrss``), a
    span reports the process's peak so far: at least what an earlier span held."""
    with peak_rss() as big:
        _hold_200_mib()
    monkeypatch.setattr(memory, "CLEAR_REFS", tmp_path / "absent" / "clear_refs")
    with peak_rss() as kept:
        pass
    monkeypatch.setattr(memory, "STATUS", tmp_path / "absent" / "status")
    with peak_rss() as rusage:
        pass
    assert kept.lifetime and rusage.lifetime
    assert rusage.mib >= big.mib >= 200 and kept.mib >= 200
