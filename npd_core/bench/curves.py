"""Arithmetic of the headline benchmark: held-out score vs training wall clock, pure functions.

A *curve* is a list of ``(wall_s, score)`` points, ``wall_s`` ascending, the first point the
warm-start student at 0 s. ``wall_s`` is the variant's training clock: evaluation time is not in
it. Decisions, stated once here and in docs/bench.md:

- **Between checkpoints the score is interpolated linearly**; after a curve's last point it stays
  at its last score. "First reaches s" is the first time the interpolated curve is ≥ s: inside
  the segment that first crosses s, at the linear crossing point. Checkpoints are seconds apart
  for the baselines and a round apart for NPD; linear interpolation keeps the coarser grid from
  being charged a whole interval.
- **Mean curve over seeds**: every seed's curve interpolated on the union of all their times,
  then averaged. Its last value is the mean of the seeds' final scores.
- **Final score** of a run = the mean of its evaluations in the last ``FINAL_TAIL`` (25%) of the
  budget's clock, and at least ``FINAL_MIN`` (2) of them: where fewer fall in that window, its
  last ``FINAL_MIN`` evaluations. One rule for every variant (``final_score``).
- **Speedup at a target** = (time for ``onpolicy``'s mean curve to first reach the target) ÷ (time
  for ``npd``'s mean curve to first reach it). Targets are fractions of onpolicy's gain: start
  + f × (mean final − start), f in ``TARGET_FRACTIONS``; f = 1 is onpolicy's own final score.
  Undefined (``None`` with a reason) when npd never reaches it, or when onpolicy ends no higher
  than it started (nothing to reach). The same arithmetic on another x axis (teacher forward
  tokens instead of seconds) gives the sample-efficiency ratio.

The seeds' intervals (95%) and the bench's summary are in :mod:`npd_core.bench.stats`; the
training clock the curves are on is :mod:`npd_core.bench.clock`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Curve = list[tuple[float, float]]
FINAL_TAIL = 0.25  # the final score averages the evaluations in this last share of the clock
FINAL_MIN = 2  # … and at least this many of them
TARGET_FRACTIONS = (0.5, 0.75, 0.9, 1.0)  # speedup targets, as fractions of onpolicy's gain


def time_to_reach(curve: Curve, target: float) -> float | None:
    """First wall time at which the linearly interpolated ``curve`` is ≥ ``target``; None if never.

    >>> time_to_reach([(0, 10), (10, 30), (20, 50)], 40)
    15.0
    """
    (t_prev, s_prev), *rest = curve
    if s_prev >= target:
        return float(t_prev)
    for t, s in rest:
        if s >= target:
            return float(t_prev + (t - t_prev) * (target - s_prev) / (s - s_prev))
        t_prev, s_prev = t, s
    return None


def at_times(curve: Curve, times: Sequence[float]) -> np.ndarray:
    """The curve's score at ``times``: linear between points, constant beyond either end."""
    t, s = np.array(curve, dtype=float).T
    return np.interp(np.asarray(times, dtype=float), t, s)


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """Pointwise mean of the seeds' curves on the union of their checkpoint times."""
    times = sorted({t for c in curves for t, _ in c})
    mean = np.mean([at_times(c, times) for c in curves], axis=0)
    return [(float(t), float(s)) for t, s in zip(times, mean, strict=True)]


def truncate(curve: Curve, budget_s: float) -> Curve:
    """The points within the budget (the warm start always stays)."""
    return [curve[0]] + [p for p in curve[1:] if p[0] <= budget_s]


def final_points(curve: Curve, budget_s: float) -> Curve:
    """The evaluations the final score averages: those at or after ``(1 − FINAL_TAIL) ×
    budget_s``, or the last ``FINAL_MIN`` when fewer fall there (θ_0 at 0 s never counts)."""
    evals = curve[1:] or curve
    tail = [p for p in evals if p[0] >= (1 - FINAL_TAIL) * budget_s]
    return tail if len(tail) >= FINAL_MIN else evals[-FINAL_MIN:]


def final_score(curve: Curve, budget_s: float) -> float:
    """Mean score of ``final_points`` (module docstring)."""
    return float(np.mean([s for _, s in final_points(curve, budget_s)]))


@dataclass
class Speedup:
    value: float | None  # onpolicy_s ÷ npd_s; None when undefined (see reason)
    target: float  # the score both curves are timed to
    onpolicy_s: float | None  # (or tokens, on another axis)
    npd_s: float | None
    reason: str | None = None
    fraction: float = 1.0  # of onpolicy's gain the target stands for


def speedup(
    onpolicy: Sequence[Curve],
    npd: Sequence[Curve],
    fraction: float = 1.0,
    finals: Sequence[float] | None = None,
) -> Speedup:
    """Speedup of npd over onpolicy to ``fraction`` of onpolicy's gain (module docstring).
    ``finals``: onpolicy's final scores per seed (``final_score``); default its curves' last
    points."""
    on, nd = mean_curve(onpolicy), mean_curve(npd)
    final = float(np.mean(finals)) if finals is not None else on[-1][1]
    target = on[0][1] + fraction * (final - on[0][1])
    t_on, t_npd = time_to_reach(on, target), time_to_reach(nd, target)
    if not t_on:  # reached at 0 s: onpolicy ended no higher than it started
        return Speedup(
            None, target, t_on, t_npd, "onpolicy's final score is not above its start score",
            fraction,
        )  # fmt: skip
    if t_npd is None:
        best = max(s for _, s in nd)
        why = f"npd never reached {target:.2f} (its best: {best:.2f})"
        return Speedup(None, target, t_on, None, why, fraction)
    if t_npd == 0:
        why = "npd's start score is already at the target"
        return Speedup(None, target, t_on, 0.0, why, fraction)
    return Speedup(t_on / t_npd, target, t_on, t_npd, None, fraction)
