"""npd_core.iotime: the spans of decorated calls, per recording context, merged."""

from __future__ import annotations

import threading

from npd_core import iotime
from npd_core.models import load_model


@iotime.timed
def _inner() -> int:
    return 1


@iotime.timed
def _outer() -> int:
    return _inner() + 1  # nested: one span, not two


def test_spans_are_recorded_in_their_own_context_only_and_merged():
    assert _outer() == 2  # outside a recording: just the call
    with iotime.recording() as spans:
        _outer()
    assert len(spans) == 1 and spans[0][0] <= spans[0][1]  # the nested call inside it
    with iotime.recording() as spans:
        t = threading.Thread(target=_inner)  # another thread: another stage's context
        t.start()
        t.join()
    assert spans == []
    assert iotime.merged([(5, 6), (0, 2), (1, 3), (6, 7)]) == [(0, 3), (5, 7)]


def test_a_model_load_is_recorded(tiny_world):
    with iotime.recording() as spans:
        load_model(tiny_world.student)
    assert len(spans) == 1 and spans[0][1] > spans[0][0]
