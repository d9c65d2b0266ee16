"""The filter: well-formedness checks, then one Δ-IFD rule; every dropped sample keeps a reason.

Checks, in order (the first that applies is the reason): ``empty`` (no response token),
``unfinished`` (no EOS, only with ``drop_unfinished``), ``non_finite`` (a score that is NaN/inf:
the teacher's log-likelihood, or Δ-IFD when computed). The samples left are "in play"; the rule
turns their Δ-IFD into bounds ``[low, high]`` and drops ``below_band`` / ``above_band``.

Rules (``filter.rule``), each a pure function of the in-play Δ-IFD values:

- ``band``: the ``[q_low, q_high]`` quantiles (or the absolute bounds when given);
- ``upper`` / ``lower``: one tail of the band (the other side open);
- ``fence``: median ± k·MAD (MAD scaled by 1.4826, so k is in standard deviations for Gaussian
  data), each side on or off; drops nothing when nothing is extreme, nor when MAD is 0;
- ``none``: keeps every in-play sample (Δ-IFD need not be computed at all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # read by attribute: the method runs without pydantic
    from npd_core.config import FilterConfig

MAD_SCALE = 1.4826  # MAD × this estimates σ for Gaussian data
Bounds = tuple[float, float]


@dataclass
class FilterResult:
    kept: np.ndarray  # (N,) bool
    reasons: list[str | None]  # None where kept
    low: float  # the bounds actually applied (-inf/inf: that side open; nan: nothing in play)
    high: float
    rule: str
    params: dict[str, Any]  # the rule's parameters as configured


def _quantile_or(x: np.ndarray, q: float, absolute: float | None) -> float:
    return float(absolute) if absolute is not None else float(np.quantile(x, q))


def band(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """Keep ``[q_low, q_high]`` quantiles of ``x`` (absolute bounds override)."""
    return _quantile_or(x, cfg.q_low, cfg.abs_low), _quantile_or(x, cfg.q_high, cfg.abs_high)


def upper(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """Drop only above the band's upper bound."""
    return -np.inf, _quantile_or(x, cfg.q_high, cfg.abs_high)


def lower(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """Drop only below the band's lower bound."""
    return _quantile_or(x, cfg.q_low, cfg.abs_low), np.inf


def fence(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """median ± k·MAD·1.4826 on the sides that are on; open bounds when MAD is 0."""
    med = float(np.median(x))
    spread = cfg.k * MAD_SCALE * float(np.median(np.abs(x - med)))
    if spread == 0:
        return -np.inf, np.inf
    low = med - spread if cfg.sides in ("both", "low") else -np.inf
    high = med + spread if cfg.sides in ("both", "high") else np.inf
    return low, high


def none(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """Keep everything in play."""
    return -np.inf, np.inf


RULES: dict[str, Callable[[np.ndarray, FilterConfig], Bounds]] = {
    "band": band,
    "upper": upper,
    "lower": lower,
    "fence": fence,
    "none": none,
}


def rule_params(cfg: FilterConfig) -> dict[str, Any]:
    """The parameters the configured rule reads (what the store records beside it)."""
    keys = {
        "band": ("q_low", "q_high", "abs_low", "abs_high"),
        "upper": ("q_high", "abs_high"),
        "lower": ("q_low", "abs_low"),
        "fence": ("k", "sides"),
        "none": (),
    }[cfg.rule]
    return {k: getattr(cfg, k) for k in (*keys, "drop_unfinished")}


def apply_filter(
    delta: np.ndarray | None,
    teacher_logprob: np.ndarray,
    response_tokens: np.ndarray,
    finished: np.ndarray,
    cfg: FilterConfig,
) -> FilterResult:
    """Decide ``kept`` and ``filter_reason`` for one round's samples. Shapes: (N,) each;
    ``delta`` is None when Δ-IFD was not computed (then only a rule that needs none may run)."""
    if delta is None and cfg.rule != "none":
        raise ValueError(f"filter.rule {cfg.rule!r} needs Δ-IFD, which was not computed")
    n = len(response_tokens)
    d = np.full(n, np.nan) if delta is None else np.asarray(delta, dtype=np.float64)
    bad = ~np.isfinite(np.asarray(teacher_logprob, dtype=np.float64))
    if delta is not None:
        bad |= ~np.isfinite(d)
    empty = np.asarray(response_tokens) == 0
    unfinished = ~np.asarray(finished, dtype=bool) if cfg.drop_unfinished else np.zeros(n, bool)
    reasons: list[str | None] = [
        "empty" if empty[i] else "unfinished" if unfinished[i] else "non_finite" if bad[i] else None
        for i in range(n)
    ]
    live = np.array([r is None for r in reasons], dtype=bool)
    low = high = float("nan")
    if live.any():
        low, high = (float(v) for v in RULES[cfg.rule](d[live], cfg))
        for i in np.flatnonzero(live):
            if d[i] < low:
                reasons[i] = "below_band"
            elif d[i] > high:
                reasons[i] = "above_band"
    kept = np.array([r is None for r in reasons], dtype=bool)
    return FilterResult(kept, reasons, low, high, cfg.rule, rule_params(cfg))


def dropped_kl_share(kept: np.ndarray, kl_sum: np.ndarray | None) -> float | None:
    """Share of the round's forward-KL mass (Σ over tokens and samples) in dropped rows; None
    when the student was not scored (no per-sample KL)."""
    if kl_sum is None:
        return None
    kl = np.nan_to_num(np.asarray(kl_sum, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    total = kl.sum()
    return float(kl[~np.asarray(kept, dtype=bool)].sum() / total) if total > 0 else 0.0
