"""The bench's statistics on hand-made numbers: t and Welch intervals, the speedup's bootstrap."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from npd_core.bench import curves as cv
from npd_core.bench import stats as st


def test_mean_ci_is_the_t_interval():
    lo, hi = st.mean_ci([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd 1
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert half == pytest.approx(2.484, abs=1e-3)
    assert st.mean_ci([5.0]) is None


def test_diff_ci_is_welch():
    a, b = [10.0, 12.0, 14.0], [1.0, 2.0, 3.0]
    lo, hi = st.diff_ci(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ref.low, ref.high))
    assert st.diff_ci([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0)  # no spread: a point
    assert st.diff_ci([1.0], [0.0, 2.0]) is None


def test_speedup_ci_brackets_the_estimate_and_counts_never_as_zero():
    on = [[(0, 0), (100, 50)], [(0, 0), (120, 50)], [(0, 0), (80, 50)]]
    nd = [[(0, 0), (10, 50)], [(0, 0), (20, 50)], [(0, 0), (15, 50)]]
    lo, hi = st.speedup_ci(on, nd, n_resamples=500)
    assert lo <= cv.speedup(on, nd).value <= hi
    assert lo >= 4 and hi <= 12  # 80/20 … 120/10 bound every resample
    # one npd seed never gets there: some resamples are all that seed → counted as 0
    nd_bad = [*nd[:2], [(0, 0), (10, 5)]]
    lo_bad, _ = st.speedup_ci(on, nd_bad, n_resamples=500)
    assert lo_bad == 0.0
    assert st.speedup_ci(on[:1], nd, n_resamples=10) is None  # one seed: no interval


def test_speedup_ci_resamples_finals_with_their_curves():
    on = [[(0, 0), (100, 40)], [(0, 0), (100, 60)]]
    nd = [[(0, 0), (50, 60)], [(0, 0), (50, 60)]]
    ci = st.speedup_ci(on, nd, n_resamples=300, fraction=1.0, finals=[40.0, 60.0])
    # every resample: onpolicy's mean curve reaches its mean final at 100 s; npd reaches any
    # target in 0–60 at ≤ 50 s, the target ≤ 60, so the ratio is ≥ 2
    assert ci is not None and ci[0] >= 2.0 - 1e-9
    with pytest.raises(ValueError):
        st.speedup_ci(on, nd, finals=[40.0])  # one final per onpolicy curve
