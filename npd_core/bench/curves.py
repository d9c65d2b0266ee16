"""Arithmetic of the headline benchmark: held-out score vs training wall clock, pure functions.

A *curve* is a list of ``(wall_s, score)`` points, ``wall_s`` ascending, the first point the
warm-start student at 0 s. ``wall_s`` is the variant's training clock: evaluation time is not in
it. Decisions, stated once here and in the README:

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
- **Intervals (95%)**: a mean over seeds gets a Student-t interval; a difference of two means a
  Welch t-interval; the speedup, a ratio of crossing times, a percentile bootstrap over seeds
  (each method's seeds resampled independently). With one seed there is no interval (``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

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


def bootstrap_ci(
    groups: Sequence[Sequence[Curve]],
    statistic: Callable[..., float | None],
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile 95% interval of ``statistic(*groups)``, each group's seeds resampled
    independently with replacement. Resamples where the statistic is undefined are dropped;
    None with fewer than two seeds in a group or no defined resample."""
    if any(len(g) < 2 for g in groups):
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        picks = [[g[i] for i in rng.integers(0, len(g), len(g))] for g in groups]
        v = statistic(*picks)
        if v is not None:
            values.append(v)
    if not values:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def speedup_ci(
    onpolicy: Sequence[Curve],
    npd: Sequence[Curve],
    n_resamples: int = 2000,
    seed: int = 0,
    fraction: float = 1.0,
    finals: Sequence[float] | None = None,
) -> tuple[float, float] | None:
    """Bootstrap interval of the speedup; a resample where npd never gets there counts as 0.
    ``finals`` (onpolicy's per seed, in its curves' order) are resampled with their curves."""
    paired = list(zip(onpolicy, finals, strict=True)) if finals is not None else None

    def stat(on: Sequence[Curve], nd: Sequence[Curve]) -> float | None:
        if paired is not None:  # `on` holds indices into paired
            picks = [paired[i] for i in on]
            s = speedup([c for c, _ in picks], nd, fraction, [f for _, f in picks])
        else:
            s = speedup(on, nd, fraction)
        if s.value is None and s.onpolicy_s and s.npd_s is None:
            return 0.0
        return s.value

    first = list(range(len(onpolicy))) if paired is not None else onpolicy
    return bootstrap_ci([first, npd], stat, n_resamples, seed)


def mean_ci(values: Sequence[float]) -> tuple[float, float] | None:
    """Student-t 95% interval of the mean; None for fewer than two values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def diff_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """Welch 95% interval of mean(a) − mean(b); None when either has fewer than two values."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        return None
    d = x.mean() - y.mean()
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = np.sqrt(vx + vy)
    if se == 0:
        return float(d), float(d)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = stats.t.ppf(0.975, df) * se
    return float(d - half), float(d + half)


def paused_clock(intervals: Sequence[tuple[float, float, bool]]) -> Callable[[float], float]:
    """A training clock from stage intervals ``(start, end, is_evaluation)`` (absolute times).

    ``clock(T)`` = time since the first stage started, minus the time before ``T`` during which
    no stage but evaluation ran: the clock pauses while evaluating alone and in the gaps between
    stages (orchestration: the baselines' clocks stop between their segments too). Evaluation
    that overlaps another stage is not subtracted (that stage's work is real time), so this
    never credits a variant with more than the paused-clock baselines get.
    """
    t0 = min(s for s, _, _ in intervals)
    edges = sorted({x for s, e, _ in intervals for x in (s, e)})
    paused = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        mid = (a + b) / 2
        if all(ev for s, e, ev in intervals if s <= mid < e):  # evaluation alone, or nothing
            paused.append((a, b))

    def clock(t: float) -> float:
        off = sum(max(0.0, min(b, t) - a) for a, b in paused)
        return t - t0 - off

    return clock
