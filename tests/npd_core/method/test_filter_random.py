"""The ``random`` rule, the filter study's control: it keeps ``round(keep × in play)`` of the
well-formed samples, the same ones for the same run seed and round, the share per round."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from npd_core.config import FilterConfig
from npd_core.method.filter import apply_filter


def _random(cfg: FilterConfig, n: int = 40, r: int = 1, seed: int = 0, tokens=None):
    tokens = np.ones(n, int) if tokens is None else np.asarray(tokens)
    return apply_filter(None, np.zeros(n), tokens, np.ones(n, bool), cfg, r=r, seed=seed)


def test_random_keeps_the_share_of_the_well_formed_samples_by_seed_and_round():
    cfg = FilterConfig(rule="random", keep=0.75)
    res = _random(cfg)
    assert res.kept.sum() == 30 and res.reasons.count("random") == 10
    assert np.array_equal(_random(cfg).kept, res.kept)  # same seed and round: same rows
    assert not np.array_equal(_random(cfg, r=2).kept, res.kept)
    assert not np.array_equal(_random(cfg, seed=1).kept, res.kept)
    # empty rows are dropped as such and the share is of the 30 well-formed ones: 22 (22.5 → 22)
    tokens = np.r_[np.zeros(10, int), np.ones(30, int)]
    res = _random(cfg, tokens=tokens)
    assert res.reasons[:10] == ["empty"] * 10 and res.kept.sum() == 22
    assert res.params == {"keep": 0.75, "keep_by_round": None, "drop_unfinished": False}
    assert np.isnan(res.low) and np.isnan(res.high)  # no bounds: it reads no score


def test_random_takes_each_rounds_own_share():
    cfg = FilterConfig(rule="random", keep=0.5, keep_by_round={1: 0.9, 2: 0.25})
    assert [_random(cfg, r=r).kept.sum() for r in (1, 2, 3)] == [36, 10, 20]
    assert _random(FilterConfig(rule="random", keep=0.0)).kept.sum() == 0
    assert _random(FilterConfig(rule="random")).kept.all()  # keep defaults to 1
    assert not FilterConfig(rule="random", score="learner_ratio").weighs_steps
    assert not FilterConfig(rule="random", score="delta_ifd").needs_views
    with pytest.raises(ValidationError, match=r"keep_by_round \{3: 1.5\}"):
        FilterConfig(rule="random", keep_by_round={3: 1.5})
