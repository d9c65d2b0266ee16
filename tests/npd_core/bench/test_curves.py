"""The benchmark's arithmetic on hand-made curves: crossing times, mean curves, speedup."""

from __future__ import annotations

import pytest

from npd_core.bench import curves as cv


def test_time_to_reach_interpolates_linearly_and_holds_after_the_end():
    c = [(0.0, 10.0), (10.0, 30.0), (20.0, 50.0)]
    assert cv.time_to_reach(c, 40.0) == 15.0  # halfway along the segment 30 → 50
    assert cv.time_to_reach(c, 30.0) == 10.0  # exactly at a checkpoint
    assert cv.time_to_reach(c, 5.0) == 0.0  # the start already is above
    assert cv.time_to_reach(c, 50.1) is None
    # a dip: the *first* crossing counts
    assert cv.time_to_reach([(0, 0), (10, 60), (20, 40), (30, 70)], 50) == pytest.approx(25 / 3)
    assert list(cv.at_times(c, [-1, 5, 25])) == [10.0, 20.0, 50.0]


def test_mean_curve_on_union_of_times():
    a = [(0.0, 0.0), (10.0, 20.0)]
    b = [(0.0, 0.0), (5.0, 40.0), (15.0, 40.0)]
    m = cv.mean_curve([a, b])
    # a at 5 s = 10 (interpolated), at 15 s = 20 (held); b as given
    assert m == [(0.0, 0.0), (5.0, 25.0), (10.0, 30.0), (15.0, 30.0)]
    assert m[-1][1] == (a[-1][1] + b[-1][1]) / 2  # last point = mean of finals


def test_speedup_on_hand_made_curves():
    onpolicy = [[(0, 10), (100, 40), (200, 50)]]  # reaches its final 50 at 200 s
    npd = [[(0, 10), (20, 45), (40, 55), (60, 60)]]  # first ≥ 50 at 20 + 20·(5/10) = 30 s
    s = cv.speedup(onpolicy, npd)
    assert s.target == 50 and s.onpolicy_s == 200 and s.npd_s == 30
    assert s.value == pytest.approx(200 / 30) and s.reason is None


def test_speedup_undefined_cases_say_why():
    never = cv.speedup([[(0, 10), (100, 50)]], [[(0, 10), (50, 30), (100, 45)]])
    assert never.value is None and never.npd_s is None and "never reached 50.00" in never.reason
    assert "45.00" in never.reason
    flat = cv.speedup([[(0, 10), (100, 9)]], [[(0, 10), (50, 30)]])
    assert flat.value is None and "not above its start" in flat.reason


def test_speedup_uses_mean_curves_over_seeds():
    on = [[(0, 0), (100, 40)], [(0, 0), (100, 60)]]  # mean final 50, reached at 100 s
    nd = [[(0, 0), (10, 100)], [(0, 0), (10, 0), (20, 100)]]  # mean: 50 at 10 s
    s = cv.speedup(on, nd)
    assert s.target == 50 and s.npd_s == 10 and s.value == 10


def test_truncate_keeps_the_start():
    c = [(0.0, 1.0), (50.0, 2.0), (101.0, 3.0)]
    assert cv.truncate(c, 100.0) == [(0.0, 1.0), (50.0, 2.0)]


def test_final_score_is_the_mean_of_the_last_quarter_and_at_least_two_points():
    dense = [(0, 1.0), (20, 10.0), (70, 20.0), (80, 30.0), (90, 40.0), (100, 50.0)]
    # last 25% of a 100 s budget: evaluations at 80, 90, 100 s
    assert cv.final_points(dense, 100.0) == [(80, 30.0), (90, 40.0), (100, 50.0)]
    assert cv.final_score(dense, 100.0) == pytest.approx(40.0)
    sparse = [(0, 1.0), (30, 10.0), (60, 20.0), (99, 30.0)]  # one point in the window
    assert cv.final_points(sparse, 100.0) == [(60, 20.0), (99, 30.0)]
    assert cv.final_score(sparse, 100.0) == pytest.approx(25.0)
    assert cv.final_score([(0, 1.0), (50, 9.0)], 100.0) == 9.0  # θ_0 never counts


def test_speedup_at_fractions_of_onpolicys_gain():
    onpolicy = [[(0, 10), (100, 30), (200, 50)]]
    npd = [[(0, 10), (20, 30), (60, 50)]]
    half = cv.speedup(onpolicy, npd, fraction=0.5)  # target 10 + 0.5·40 = 30
    assert half.target == 30 and half.onpolicy_s == 100 and half.npd_s == 20
    assert half.value == pytest.approx(5.0) and half.fraction == 0.5
    # the target follows the final-score rule when finals are given: mean of 46 → target 46
    s = cv.speedup(onpolicy, npd, fraction=1.0, finals=[46.0])
    assert s.target == 46 and s.onpolicy_s == pytest.approx(180) and s.npd_s == pytest.approx(52)
