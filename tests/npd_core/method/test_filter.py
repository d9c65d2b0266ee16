"""The filter: well-formedness checks, each rule on hand-made arrays, each score it can read
(hand-made sums; the learner ratio on a tiny model), old configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npd_core.config import FilterConfig, NPDConfig
from npd_core.method.filter import (
    MAD_SCALE,
    ScoreColumns,
    apply_filter,
    dropped_kl_share,
    fence,
    learner_ratio,
    sample_scores,
    step_weights,
)


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
        q_low=0.2,
        q_high=0.8,
        abs_low=None,
        abs_high=None,
        score="delta_ifd",
        ifd_form="log_ratio",
        drop_unfinished=True,
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
    assert lo.params == dict(
        q_low=0.1, abs_low=None, score="delta_ifd", ifd_form="log_ratio", drop_unfinished=True
    )


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
    with pytest.raises(ValueError, match="needs filter.score 'delta_ifd'"):
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


# Two samples of 2 tokens. Conditional sums: teacher −4 and −1, generator −2 and −1.5;
# prompt-less sums: teacher −6 and −3, student −3 and −2.
_COLS = ScoreColumns(
    n_tokens=np.array([2, 2]),
    teacher_cond=np.array([-4.0, -1.0]),
    generator_cond=np.array([-2.0, -1.5]),
    delta_ifd=np.array([0.5, -0.75]),  # (−6+4)/2 − (−3+2)/2 = −0.5; (−3+1)/2 − (−2+1.5)/2
    teacher_resp=np.array([-6.0, -3.0]),
    student_cond=np.array([-2.0, -1.5]),
    student_resp=np.array([-3.0, -2.0]),
)


def test_each_score_from_hand_made_sums():
    def got(**kw):
        return sample_scores(_COLS, FilterConfig(rule="upper", **kw))

    # conditional = L_c^T − L_c^S: (4 − 2)/2 = 1, (1 − 1.5)/2 = −0.25
    np.testing.assert_allclose(got(score="conditional"), [1.0, -0.25])
    np.testing.assert_allclose(got(score="teacher_nll"), [2.0, 0.5])
    np.testing.assert_array_equal(got(score="delta_ifd"), _COLS.delta_ifd)  # the stored column
    # Cherry's ratio: IFD_T = (4/2)/(6/2) = 2/3, IFD_S = (2/2)/(3/2) = 2/3 → 0;
    # second: IFD_T = 0.5/1.5 = 1/3, IFD_S = 0.75/1.0 = 3/4 → 1/3 − 3/4
    np.testing.assert_allclose(got(score="delta_ifd", ifd_form="ratio"), [0.0, 1 / 3 - 3 / 4])
    assert sample_scores(_COLS, _ratio_cfg(rule="upper")) is None  # the train step's


def test_rules_apply_to_the_chosen_score_and_exempt_fixed_source_rows():
    cols = ScoreColumns(
        n_tokens=np.array([1, 1, 1, 1, 1]),
        teacher_cond=np.array([-1.0, -1.0, -9.0, -1.0, -1.0]),
        generator_cond=np.array([-1.0, -0.5, -1.0, -2.0, np.nan]),  # the last: a fixed source
    )
    cfg = FilterConfig(rule="upper", score="conditional", abs_high=1.0)
    score = sample_scores(cols, cfg)
    np.testing.assert_allclose(score[:4], [0.0, 0.5, 8.0, -1.0])
    exempt = np.array([False, False, False, False, True])
    res = apply_filter(
        score, cols.teacher_cond, np.ones(5, int), np.ones(5, bool), cfg, exempt=exempt
    )
    assert res.reasons == [None, None, "above_band", None, None]
    assert res.params["score"] == "conditional" and "ifd_form" not in res.params
    # without the exemption the fixed-source row's NaN score is ill-formed
    plain = apply_filter(score, cols.teacher_cond, np.ones(5, int), np.ones(5, bool), cfg)
    assert plain.reasons[4] == "non_finite"
    # teacher_nll with the band's quantiles: drops the highest NLL (9); the rest tie at 1
    band = FilterConfig(rule="band", score="teacher_nll", q_low=0.1, q_high=0.9)
    res = _run(sample_scores(cols, band), band)
    assert res.reasons[2] == "above_band" and res.kept.sum() == 4


def test_views_only_for_delta_ifd_rules():
    assert FilterConfig(rule="fence").needs_views is True
    for score in ("conditional", "teacher_nll"):
        assert FilterConfig(rule="fence", score=score).needs_views is False


def _ratio_cfg(**kw) -> FilterConfig:
    return FilterConfig(score="learner_ratio", **kw)


def test_the_learner_ratio_rule_is_the_train_steps():
    """The filter stage checks well-formedness only; the train step weighs (and only under a
    rule), one learner process at a time."""
    assert _ratio_cfg(rule="fence").weighs_steps and not _ratio_cfg(rule="none").weighs_steps
    assert not FilterConfig(rule="fence").weighs_steps
    with pytest.raises(ValueError, match=r"set train.nproc: 1 \(is 2\)"):
        NPDConfig(filter=_ratio_cfg(rule="fence"), train=dict(nproc=2, rows_per_step=2))
    res = _run(None, _ratio_cfg(rule="fence"), tokens=[2, 0, 2])
    assert res.reasons == [None, "empty", None]  # well-formedness only
    assert res.params["score"] == "learner_ratio" and res.params["ratio_clip"] is None


def test_step_weights_fence_and_clip():
    r = np.array([0.0, 0.01, -0.01, 0.02, -0.02, 0.0, 2.0, np.nan])  # 2.0: stale; NaN: fixed
    fence_cfg = _ratio_cfg(rule="fence", k=3)
    np.testing.assert_array_equal(step_weights(r, fence_cfg), [1, 1, 1, 1, 1, 1, 0, 1])
    clip = _ratio_cfg(rule="fence", k=3, ratio_clip=1.0)
    w = step_weights(r, clip)
    np.testing.assert_allclose(w[:6], np.minimum(1.0, np.exp(r[:6])))
    assert w[6] == 0.0 and w[7] == 1.0
    lower = _ratio_cfg(rule="lower", abs_low=-0.015)
    np.testing.assert_array_equal(step_weights(r, lower), [1, 1, 1, 1, 0, 1, 1, 1])


def test_learner_ratio_on_a_tiny_model_with_a_known_drift():
    """Learner = generator with +b on token j's logit: per token, log p_L(y) − log p_G(y) =
    b·[y = j] − log(1 + p_G(j | ctx)(e^b − 1)), averaged over each sequence's tokens."""
    g = torch.Generator().manual_seed(0)
    V, j, b = 6, 2, 0.7
    gen_table = torch.randn(V, V, generator=g)
    learn_table = gen_table.clone()
    learn_table[:, j] += b
    ctx = torch.tensor([0, 3, 2, 5, 1, 2, 4])  # previous tokens of 3 packed sequences
    y = torch.tensor([3, 2, 2, 1, 2, 4, 0])  # their sampled tokens
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    lp_gen = torch.log_softmax(gen_table[ctx], -1).gather(-1, y[:, None]).squeeze(-1)
    lp_learn = torch.log_softmax(learn_table[ctx], -1).gather(-1, y[:, None]).squeeze(-1)
    gen_lp = lp_gen.clone()
    gen_lp[5:] = float("nan")  # sequence 2: a fixed source, no generator
    got = learner_ratio(lp_learn, gen_lp, seq, 3)
    p_j = torch.softmax(gen_table[ctx], -1)[:, j]
    want = b * (y == j).float() - torch.log1p(p_j * (math.exp(b) - 1))
    torch.testing.assert_close(got[:2], torch.stack([want[:3].mean(), want[3:5].mean()]))
    assert torch.isnan(got[2])
    same = learner_ratio(lp_gen, lp_gen, seq, 3)
    assert torch.equal(same, torch.zeros(3))  # learner = generator: every ratio 0
