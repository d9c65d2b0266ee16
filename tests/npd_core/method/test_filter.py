"""The filter: well-formedness checks, each Δ-IFD rule on hand-made arrays, old configs."""

from __future__ import annotations

import numpy as np
import pytest

from npd_core.config import FilterConfig
from npd_core.method.filter import MAD_SCALE, apply_filter, dropped_kl_share, fence


def _run(delta, cfg, tokens=None, finished=None, teacher=None):
    n = len(next(x for x in (delta, tokens, finished, teacher) if x is not None))
    return apply_filter(
        None if delta is None else np.asarray(delta, dtype=float),
        np.zeros(n) if teacher is None else np.asarray(teacher, dtype=float),
        np.ones(n, int) if tokens is None else np.asarray(tokens),
        np.ones(n, bool) if finished is None else np.asarray(finished),
        cfg,
    )


def test_band_and_reasons():
    delta = np.array([np.nan, 0.0, -5.0, 5.0, 0.1, 0.2, 0.3, np.inf, -0.1, 0.05])
    tokens = np.array([3, 0, 3, 3, 3, 3, 3, 3, 3, 3])
    finished = np.array([True, True, True, True, False, True, True, True, True, True])
    cfg = FilterConfig(rule="band", q_low=0.2, q_high=0.8, drop_unfinished=True)
    res = _run(delta, cfg, tokens, finished)
    assert res.reasons[0] == "non_finite" and res.reasons[7] == "non_finite"
    assert res.reasons[1] == "empty"
    assert res.reasons[4] == "unfinished"
    live = np.array([-5.0, 5.0, 0.2, 0.3, -0.1, 0.05])
    assert res.low == pytest.approx(np.quantile(live, 0.2))
    assert res.high == pytest.approx(np.quantile(live, 0.8))
    assert res.reasons[2] == "below_band" and res.reasons[3] == "above_band"
    assert list(np.flatnonzero(res.kept)) == [5, 6, 8, 9]
    assert all((r is None) == k for r, k in zip(res.reasons, res.kept, strict=True))
    assert res.rule == "band"
    assert res.params == dict(
        q_low=0.2, q_high=0.8, abs_low=None, abs_high=None, drop_unfinished=True
    )


def test_absolute_bounds_and_one_tail_rules():
    delta = np.linspace(-1, 1, 11)
    res = _run(delta, FilterConfig(rule="band", abs_low=-0.5, abs_high=0.25))
    assert res.kept.sum() == 4  # -0.4 … 0.2
    up = _run(delta, FilterConfig(rule="upper", abs_high=0.25))
    assert up.low == -np.inf and list(np.flatnonzero(~up.kept)) == [7, 8, 9, 10]
    assert set(up.reasons) == {None, "above_band"}
    lo = _run(delta, FilterConfig(rule="lower", q_low=0.1, drop_unfinished=True))
    assert lo.high == np.inf and lo.low == pytest.approx(-0.8)
    assert list(np.flatnonzero(~lo.kept)) == [0]
    assert lo.params == dict(q_low=0.1, abs_low=None, drop_unfinished=True)


def test_none_needs_no_delta_and_keeps_unfinished_when_asked():
    cfg = FilterConfig(rule="none", drop_unfinished=False)
    res = _run(None, cfg, tokens=[2, 0, 5], finished=[False, True, False])
    assert list(res.kept) == [True, False, True]
    assert res.reasons == [None, "empty", None]
    assert (res.low, res.high) == (-np.inf, np.inf)
    dropping = _run(
        None, FilterConfig(rule="none", drop_unfinished=True), finished=[False, True, True]
    )
    assert dropping.reasons == ["unfinished", None, None]
    # a non-finite teacher log-likelihood is ill-formed whatever the rule
    assert _run(None, cfg, teacher=[0.0, np.nan, -np.inf]).reasons == [
        None,
        "non_finite",
        "non_finite",
    ]
    with pytest.raises(ValueError, match="needs Δ-IFD"):
        _run(None, FilterConfig(rule="fence"), tokens=[1, 1])


def test_fence_keeps_gaussian_and_drops_planted_outliers():
    x = np.random.default_rng(0).normal(2.0, 0.5, 10_000)
    assert _run(x, FilterConfig(rule="fence", k=5)).kept.all()
    planted = np.concatenate([x, [2.0 + 4.0, 2.0 - 4.0, 2.0 + 3.0]])  # 8σ, −8σ, 6σ
    res = _run(planted, FilterConfig(rule="fence", k=5))
    assert list(np.flatnonzero(~res.kept)) == [10_000, 10_001, 10_002]
    assert res.reasons[10_000] == "above_band" and res.reasons[10_001] == "below_band"
    med = np.median(planted)
    mad = np.median(np.abs(planted - med))
    assert res.high == pytest.approx(med + 5 * MAD_SCALE * mad)
    high_only = _run(planted, FilterConfig(rule="fence", k=5, sides="high"))
    assert list(np.flatnonzero(~high_only.kept)) == [10_000, 10_002]
    assert high_only.low == -np.inf


def test_fence_on_degenerate_inputs():
    cfg = FilterConfig(rule="fence", k=3)
    assert _run(np.full(50, 0.7), cfg).kept.all()  # all equal: MAD 0, nothing extreme
    mostly_equal = np.array([1.0] * 9 + [50.0])  # MAD 0 too: no scale to call 50 extreme
    assert _run(mostly_equal, cfg).kept.all()
    assert fence(np.array([3.0]), cfg) == (-np.inf, np.inf)
    one = _run([0.4], cfg)
    assert one.kept.all() and one.low == -np.inf
    heavy = np.random.default_rng(1).standard_t(df=1.5, size=2_000)  # heavy tails
    res = _run(heavy, cfg)
    dropped = heavy[~res.kept]
    assert 0 < len(dropped) < 0.2 * len(heavy)
    assert np.abs(dropped).min() > np.abs(heavy[res.kept]).max()
    nothing_in_play = _run([np.nan, np.inf], cfg)
    assert not nothing_in_play.kept.any() and np.isnan(nothing_in_play.low)


def test_dropped_kl_share():
    kept = np.array([True, False, True, False])
    assert dropped_kl_share(kept, np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.6)
    assert dropped_kl_share(kept, np.array([1.0, np.nan, 3.0, 0.0])) == 0.0
    assert dropped_kl_share(kept, None) is None


def test_old_filter_configs_map_to_rules():
    with pytest.warns(FutureWarning, match="filter.enabled: False is now filter.rule: none"):
        assert FilterConfig.model_validate({"enabled": False}).rule == "none"
    with pytest.warns(FutureWarning, match="filter.rule: band"):
        old = FilterConfig.model_validate({"enabled": True, "q_low": 0.1, "q_high": 0.8})
    assert (old.rule, old.q_low, old.q_high) == ("band", 0.1, 0.8)
    with pytest.warns(FutureWarning, match="read as filter.rule: band"):
        assert FilterConfig.model_validate({"q_high": 0.95}).rule == "band"
    assert "enabled" not in FilterConfig().model_dump()
    assert FilterConfig(rule="none").needs_views is False
    assert FilterConfig(rule="none", compute_delta_ifd=True).needs_views is True
