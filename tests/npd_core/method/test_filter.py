"""Δ-IFD filter: the quantile band, absolute bounds and a reason for every dropped row."""

from __future__ import annotations

import numpy as np
import pytest

from npd_core.config import FilterConfig
from npd_core.method.filter import filter_band


def test_band_and_reasons():
    delta = np.array([np.nan, 0.0, -5.0, 5.0, 0.1, 0.2, 0.3, np.inf, -0.1, 0.05])
    tokens = np.array([3, 0, 3, 3, 3, 3, 3, 3, 3, 3])
    finished = np.array([True, True, True, True, False, True, True, True, True, True])
    res = filter_band(delta, tokens, finished, FilterConfig(q_low=0.2, q_high=0.8))
    assert res.reasons[0] == "non_finite" and res.reasons[7] == "non_finite"
    assert res.reasons[1] == "empty"
    assert res.reasons[4] == "unfinished"
    live = np.array([-5.0, 5.0, 0.2, 0.3, -0.1, 0.05])
    assert res.low == pytest.approx(np.quantile(live, 0.2))
    assert res.high == pytest.approx(np.quantile(live, 0.8))
    assert res.reasons[2] == "below_band" and res.reasons[3] == "above_band"
    assert list(np.flatnonzero(res.kept)) == [5, 6, 8, 9]
    assert all((r is None) == k for r, k in zip(res.reasons, res.kept, strict=True))


def test_absolute_bounds_and_disabled():
    delta = np.linspace(-1, 1, 11)
    ones, yes = np.ones(11, int), np.ones(11, bool)
    res = filter_band(delta, ones, yes, FilterConfig(abs_low=-0.5, abs_high=0.25))
    assert res.kept.sum() == 4  # -0.4 … 0.2
    off = filter_band(delta, ones, yes, FilterConfig(enabled=False))
    assert off.kept.all()


def test_keep_unfinished_when_asked():
    res = filter_band(
        np.zeros(3),
        np.ones(3, int),
        np.zeros(3, bool),
        FilterConfig(drop_unfinished=False, q_low=0.0, q_high=1.0),
    )
    assert res.kept.all()
