"""Peak RSS over a span: a 200 MiB array shows in the span that held it and not in the next
one, an overlapping span's reset does not hide it from the span around it, and where the mark
cannot be reset the figure is the process's peak so far and says so.

Each check runs in a fresh interpreter: in a test worker that earlier tests have grown, freed
memory can stay resident and serve the array, so neither its rise nor its fall would show."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LINUX = sys.platform.startswith("linux")

PRELUDE = """
import json, sys
from pathlib import Path
import numpy as np
from npd_core import memory
from npd_core.memory import peak_rss

def hold_200_mib():
    a = np.ones(200 * 2**20 // 8)  # written, so resident
    del a  # a large array is unmapped at once: the RSS falls back

def show(**spans):
    print(json.dumps({k: [s.mib, s.lifetime] for k, s in spans.items()}))
"""


def _spans(body: str) -> dict[str, tuple[float, bool]]:
    """Run ``body`` after ``PRELUDE`` in a fresh interpreter; its ``show(...)``'s spans."""
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, check=True
    ).stdout
    return {k: tuple(v) for k, v in json.loads(out.splitlines()[-1]).items()}


@pytest.mark.skipif(not LINUX, reason="the resettable high-water mark is Linux's")
def test_a_span_sees_the_200_mib_it_held_and_the_next_span_does_not():
    s = _spans("""
with peak_rss() as big:
    hold_200_mib()
with peak_rss() as after:
    pass
show(big=big, after=after)
""")
    assert not s["big"][1] and not s["after"][1]
    assert s["big"][0] - s["after"][0] >= 190, s


@pytest.mark.skipif(not LINUX, reason="the resettable high-water mark is Linux's")
def test_an_overlapping_spans_reset_keeps_the_outer_spans_peak():
    """Stages overlap in the flow's threads: the inner span resets the process's mark, after
    the outer one held 200 MiB; the outer span still reports them."""
    s = _spans("""
with peak_rss() as outer:
    hold_200_mib()
    with peak_rss() as inner:
        pass
show(outer=outer, inner=inner)
""")
    assert s["outer"][0] - s["inner"][0] >= 190, s


def test_without_a_reset_the_figure_is_the_peak_so_far(tmp_path):
    """Where clear_refs cannot be written, or /proc does not exist (macOS: ``ru_maxrss``), a
    span reports the process's peak so far: at least what an earlier span held."""
    s = _spans(f"""
with peak_rss() as big:
    hold_200_mib()
memory.CLEAR_REFS = Path({str(tmp_path / "absent" / "clear_refs")!r})
with peak_rss() as kept:
    pass
memory.STATUS = Path({str(tmp_path / "absent" / "status")!r})
with peak_rss() as rusage:
    pass
show(big=big, kept=kept, rusage=rusage)
""")
    assert s["kept"][1] and s["rusage"][1]
    assert s["rusage"][0] >= s["big"][0] >= 200 and s["kept"][0] >= 200, s
