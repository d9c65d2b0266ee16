"""Planted junk: the AUROC, the looping sample and the interval over rounds, on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest

from npd_core.bench.junk import auroc, bootstrap_mean_ci, loop_of


def test_auroc_hand_made():
    junk = np.array([False, False, True, True])
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), junk) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), junk) == 0.0
    assert auroc(np.ones(4), junk) == 0.5  # ties count half
    # junk 0.5 beats clean 0.1 and ties clean 0.5; junk NaN ranks above both: (1.5 + 2) / 4
    assert auroc(np.array([0.1, 0.5, 0.5, np.nan]), junk) == pytest.approx(0.875)
    # a flag set on two of the three junk rows and on neither clean row: 4 wins, 2 ties of 6
    flag = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
    got = auroc(flag, np.array([True, False, False, True, True]))
    assert got == pytest.approx((4 + 0.5 * 2) / 6)


def test_loop_of_repeats_the_first_line_to_the_cap():
    nl, eos = 9, 2
    assert loop_of([5, 6, nl, 7, eos], nl, eos, 7) == [5, 6, nl, 5, 6, nl, 5]
    assert loop_of([5, 6, eos], None, eos, 5) == [5, 6, 5, 6, 5]  # one line: all of it
    assert loop_of([eos], nl, eos, 3) == [eos, eos, eos]  # nothing but EOS


def test_bootstrap_interval_of_the_mean():
    v = [0.6, 0.7, 0.8, 0.7, 0.65]
    lo, hi = bootstrap_mean_ci(v)
    assert lo < np.mean(v) < hi and lo >= 0.6 and hi <= 0.8
    assert bootstrap_mean_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert bootstrap_mean_ci([0.7]) is None
