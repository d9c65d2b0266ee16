"""Δ-IFD filter: keep the proximal band, record a reason for every dropped sample.

Order of checks (the first that applies is the reason): ``empty`` (no response token),
``unfinished`` (no EOS, when ``drop_unfinished``), ``non_finite`` (Δ-IFD NaN/inf), then
``below_band`` / ``above_band`` against the round's ``[q_low, q_high]`` quantiles of the
samples still in play (or the absolute bounds when given).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from npd_core.config import FilterConfig


@dataclass
class FilterResult:
    kept: np.ndarray  # (N,) bool
    reasons: list[str | None]  # None where kept
    low: float  # the band actually applied (nan when no candidate)
    high: float


def filter_band(
    delta: np.ndarray, response_tokens: np.ndarray, finished: np.ndarray, cfg: FilterConfig
) -> FilterResult:
    """Decide ``kept`` and ``filter_reason`` for one round's samples. Shapes: (N,) each."""
    delta = np.asarray(delta, dtype=np.float64)
    reasons: list[str | None] = [None] * len(delta)
    for i in range(len(delta)):
        if response_tokens[i] == 0:
            reasons[i] = "empty"
        elif cfg.drop_unfinished and not finished[i]:
            reasons[i] = "unfinished"
        elif not np.isfinite(delta[i]):
            reasons[i] = "non_finite"
    live = np.array([r is None for r in reasons], dtype=bool)
    low, high = float("nan"), float("nan")
    if cfg.enabled and live.any():
        low = cfg.abs_low if cfg.abs_low is not None else float(np.quantile(delta[live], cfg.q_low))
        high = (
            cfg.abs_high
            if cfg.abs_high is not None
            else float(np.quantile(delta[live], cfg.q_high))
        )
        for i in np.flatnonzero(live):
            if delta[i] < low:
                reasons[i] = "below_band"
            elif delta[i] > high:
                reasons[i] = "above_band"
    kept = np.array([r is None for r in reasons], dtype=bool)
    return FilterResult(kept, reasons, low, high)
