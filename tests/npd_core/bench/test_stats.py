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


def test_learns_needs_a_gain_above_one_standard_error():
    # start 20, 500 prompts: SE of the difference at 23 = 100·√((0.16 + 0.1771)/500) ≈ 2.60
    assert st.score_se(20.0, 23.0, 500) == pytest.approx(2.597, abs=1e-3)
    yes = st.learns(20.0, [18.0, 23.0, 21.0], 500)
    assert yes["learns"] is True and yes["best_point_score"] == 23.0
    assert st.learns(20.0, [18.0, 22.0], 500)["learns"] is False  # 2 points: within the noise
    assert st.learns(20.0, [19.0, 20.0], 10_000)["learns"] is False  # at or below its start


def _row(final: float, learns: bool, tuned: str = "search") -> dict:
    """One seed (no bootstrap): θ_0 at 10, ``final`` at 100 s."""
    curve = [{"wall_s": 0.0, "score": 10.0}, {"wall_s": 100.0, "score": final}]
    return {"seed_curves": [curve], "final_scores": [final], "learns": learns, "tuned": tuned}


def test_every_speedup_against_a_variant_that_does_not_learn_is_undefined():
    out = st.headline_numbers({"npd": _row(40.0, True), "onpolicy": _row(11.0, False)})
    assert out["speedup_vs_onpolicy"] is None and out["speedup_ci95"] is None
    assert out["speedup_reason"].startswith("onpolicy does not learn")
    assert [x["fraction"] for x in out["speedups"]] == [0.5, 0.75, 0.9, 1.0]
    assert all(x["ratio"] is None and x["reason"] == out["speedup_reason"] for x in out["speedups"])
    assert out["npd_minus_onpolicy_points"] == pytest.approx(29.0)  # scores still compared
    both = st.headline_numbers({"npd": _row(40.0, True), "onpolicy": _row(30.0, True)})
    assert both["speedup_vs_onpolicy"] is not None and both["speedup_untuned"] is False
    raw = {"npd": _row(40.0, True, "untuned"), "onpolicy": _row(30.0, True)}
    assert st.headline_numbers(raw)["speedup_untuned"] is True
    neither = st.headline_numbers({"npd": _row(9.0, False), "onpolicy": _row(11.0, False)})
    assert neither["speedup_reason"].startswith("npd and onpolicy do not learn")


def test_an_ablation_qualifies_only_beyond_two_standard_errors():
    """npd at 90, 91, 92 (SEM 0.577) on 1,000 prompts; one seed at 93.5 has a binomial SE of
    0.780, so 2 SE is 1.94 and its margin 2.5 qualifies, while 92.5 (+1.5) does not. A baseline
    or a second npd-method row with several seeds is not an ablation."""
    npd = {"final_scores": [90.0, 91.0, 92.0], "method": "npd"}
    table = {
        "npd": npd,
        "mix-teacher": {"final_scores": [93.5], "method": "npd"},
        "staleness-0": {"final_scores": [92.5], "method": "npd"},
        "sft": {"final_scores": [95.0], "method": "sft"},
    }
    rule = st.ablations_vs_npd(table, 1000)
    assert set(rule) == {"mix-teacher", "staleness-0"}
    m = rule["mix-teacher"]
    assert m["se"] == pytest.approx(
        math.hypot(1 / math.sqrt(3), 100 * math.sqrt(0.935 * 0.065 / 1000))
    )
    assert m["margin"] == pytest.approx(2.5) and m["qualifies"] is True
    assert rule["staleness-0"]["qualifies"] is False
    assert st.ablations_vs_npd({"npd": {"final_scores": [90.0], "method": "npd"}}, 1000) == {}
    assert st.score_se(80.0, 90.0, 500) == pytest.approx(
        math.hypot(st.binomial_se(80.0, 500), st.binomial_se(90.0, 500))
    )
