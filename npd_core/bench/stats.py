"""The bench's statistics: each variant's seeds summarized, and the headline numbers (speedup over
onpolicy, score differences), each with its 95% interval.

- a mean over seeds gets a Student-t interval (:func:`mean_ci`);
- a difference of two means a Welch t-interval (:func:`diff_ci`);
- the speedup, a ratio of crossing times (:func:`npd_core.bench.curves.speedup`), a percentile
  bootstrap over seeds, each method's seeds resampled independently (:func:`speedup_ci`).

With one seed there is no interval (``None``). Final scores, mean curves and the speedup's
targets are defined in :mod:`npd_core.bench.curves`.

A variant *learns* when one of its grid points (or its own seeds' mean final score) ends above
the warm start by more than one standard error of the difference of two held-out scores
(:func:`learns`); every speedup against a variant that does not learn is undefined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from npd_core.bench import curves as cv
from npd_core.bench.curves import Curve
from npd_core.bench.harness import SLACK, VariantResult

POINT_KEYS = ("wall_s", "score", "teacher_tokens", "steps")
MAIN_PAIR = ("npd", "onpolicy")  # the speedup's two variants


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
            s = cv.speedup([c for c, _ in picks], nd, fraction, [f for _, f in picks])
        else:
            s = cv.speedup(on, nd, fraction)
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


def binomial_se(a: float, n: int) -> float:
    """Standard error, in points, of one held-out score ``a`` (0–100) on ``n`` prompts, taken
    as a binomial proportion."""
    p = min(max(a / 100, 0.0), 1.0)
    return 100 * float(np.sqrt(p * (1 - p) / max(n, 1)))


def score_se(a: float, b: float, n: int) -> float:
    """Standard error, in points, of the difference of two held-out scores ``a`` and ``b``
    (0–100) on ``n`` prompts each, each taken as a binomial proportion."""
    return float(np.hypot(binomial_se(a, n), binomial_se(b, n)))


def ablations_vs_npd(table: dict[str, dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """The rule that turns an ablation on (written before the views bench, docs/bench.md): its
    one-seed final score beats npd's mean over its seeds by more than two standard errors, npd's
    standard error of the mean combined with the binomial one of a single held-out score on
    ``n`` prompts. A qualifying ablation still needs a confirm bench of 3 seeds each. Empty
    without npd at two seeds or more."""
    finals = table.get("npd", {}).get("final_scores", [])
    if len(finals) < 2:
        return {}
    mean, sem = float(np.mean(finals)), float(np.std(finals, ddof=1) / np.sqrt(len(finals)))
    out = {}
    for name, row in table.items():
        if name == "npd" or row.get("method") != "npd" or len(row["final_scores"]) != 1:
            continue
        score = row["final_scores"][0]
        se = float(np.hypot(sem, binomial_se(score, n)))
        out[name] = {
            "score": score,
            "npd_mean": mean,
            "margin": score - mean,
            "se": se,
            "qualifies": score - mean > 2 * se,
        }
    return out


def learns(start: float, scores: Sequence[float], n: int) -> dict[str, Any]:
    """Whether any of ``scores`` (a variant's grid points and its seeds' mean final score) ends
    above ``start`` by more than one :func:`score_se` on ``n`` held-out prompts; with the best
    score and its margin, so a reader sees how close the call was."""
    best = max(scores)
    se = score_se(start, best, n)
    return {"learns": best - start > se, "best_point_score": best, "learns_se": se}


def summarize(results: list[VariantResult], budget_s: float) -> dict[str, Any]:
    """Means over seeds (curves on the union of their checkpoint times) with 95% intervals."""
    limit = budget_s * (1 + SLACK)
    kept = [r.curve[:1] + [p for p in r.curve[1:] if p["wall_s"] <= limit] for r in results]
    curves = [[(p["wall_s"], p["score"]) for p in c] for c in kept]
    finals = [cv.final_score(c, budget_s) for c in curves]
    stages = sorted({k for r in results for k in r.stage_seconds})
    by_tokens = None  # score vs teacher forward tokens, where every point carries them
    if all("teacher_tokens" in p for c in kept for p in c):
        by_tokens = cv.mean_curve([[(p["teacher_tokens"], p["score"]) for p in c] for c in kept])
    return {
        "final_score": float(np.mean(finals)),
        "final_score_ci95": mean_ci(finals),
        "final_scores": finals,
        "final_points": [len(cv.final_points(c, budget_s)) for c in curves],
        "curve_teacher_tokens": (
            [{"teacher_tokens": t, "score": s} for t, s in by_tokens] if by_tokens else None
        ),
        "seed_curves_teacher_tokens": (
            [
                [{"teacher_tokens": p["teacher_tokens"], "score": p["score"]} for p in c]
                for c in kept
            ]
            if by_tokens
            else None
        ),
        "wall_s": float(np.mean([c[-1][0] for c in curves])),
        "train_tokens": float(np.mean([r.train_tokens for r in results])),
        "generated_tokens": float(np.mean([r.generated_tokens for r in results])),
        "stage_seconds": {
            s: float(np.mean([r.stage_seconds.get(s, 0.0) for r in results])) for s in stages
        },
        # share of the clock each stage was not running (evaluation is off the clock)
        "idle_fraction": {
            s: float(
                np.mean(
                    [
                        _idle(r.stage_seconds.get(s, 0.0), c[-1][0])
                        for r, c in zip(results, curves, strict=True)
                    ]
                )
            )
            for s in stages
            if s != "evaluate"
        },
        "curve": [{"wall_s": t, "score": s} for t, s in cv.mean_curve(curves)],
        # each seed's points as measured: wall_s, score and, where the variant counts them,
        # teacher_tokens and optimizer steps (the cost model's sample efficiency)
        "seed_curves": [[{k: p[k] for k in POINT_KEYS if k in p} for p in c] for c in kept],
        "seed_totals": [
            {
                "stage_seconds": r.stage_seconds,
                "train_tokens": r.train_tokens,
                "generated_tokens": r.generated_tokens,
            }
            for r in results
        ],
        "dropped_points": sum(len(r.curve) - len(c) for r, c in zip(results, curves, strict=True)),
        "seeds": len(results),
        "settings": [r.settings for r in results],
        "run_ids": [r.run_id for r in results],
        "mlflow_run_ids": [r.mlflow_run_id for r in results],
    }


def _idle(busy_s: float, clock_s: float) -> float:
    return min(1.0, max(0.0, 1.0 - busy_s / clock_s)) if clock_s > 0 else 1.0


def headline_numbers(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speedup over onpolicy and the score differences, each with its 95% interval."""

    def curves(name: str) -> list[Curve]:
        c = table[name]["seed_curves"]
        return [[(p["wall_s"], p["score"]) for p in x] for x in c]

    def token_curves(name: str) -> list[Curve] | None:
        c = table[name].get("seed_curves_teacher_tokens")
        return [[(p["teacher_tokens"], p["score"]) for p in x] for x in c] if c else None

    out: dict[str, Any] = {
        "speedup_untuned": any(table[n].get("tuned") == "untuned" for n in MAIN_PAIR if n in table)
    }
    if "npd" in table and "onpolicy" in table:
        on, nd, finals = curves("onpolicy"), curves("npd"), table["onpolicy"]["final_scores"]
        s = cv.speedup(on, nd, 1.0, finals)
        out.update(
            speedup_vs_onpolicy=s.value,
            speedup_reason=s.reason,
            speedup_target_score=s.target,
            onpolicy_s_to_target=s.onpolicy_s,
            npd_s_to_target=s.npd_s,
            speedup_ci95=speedup_ci(on, nd, fraction=1.0, finals=finals),
            speedups=[_at_target(on, nd, f, finals) for f in cv.TARGET_FRACTIONS],
        )
        ton, tnd = token_curves("onpolicy"), token_curves("npd")
        out["teacher_token_ratios"] = (
            [_at_target(ton, tnd, f, finals) for f in cv.TARGET_FRACTIONS] if ton and tnd else None
        )
    else:
        out.update(
            speedup_vs_onpolicy=None,
            speedup_ci95=None,
            speedup_reason="needs both npd and onpolicy in --variants",
            speedups=None,
            teacher_token_ratios=None,
        )
    flat = [n for n in MAIN_PAIR if n in table and table[n].get("learns") is False]
    if flat:  # the crossing times stay (measurements); no ratio against a flat curve
        verb = "does not learn" if len(flat) == 1 else "do not learn"
        why = f"{' and '.join(flat)} {verb} (no grid point above its start by 1 SE)"
        out.update(speedup_vs_onpolicy=None, speedup_ci95=None, speedup_reason=why)
        for key in ("speedups", "teacher_token_ratios"):
            if out[key]:
                out[key] = [{**x, "ratio": None, "ci95": None, "reason": why} for x in out[key]]
    for other in ("sft", "onpolicy"):
        key = f"npd_minus_{other}_points"
        if "npd" in table and other in table:
            a, b = table["npd"]["final_scores"], table[other]["final_scores"]
            out[key] = float(np.mean(a) - np.mean(b))
            out[f"{key}_ci95"] = diff_ci(a, b)
        else:
            out[key], out[f"{key}_ci95"] = None, None
    return out


def _at_target(
    onpolicy: list[Curve], npd: list[Curve], fraction: float, finals: list[float]
) -> dict[str, Any]:
    """onpolicy's x ÷ npd's x to ``fraction`` of onpolicy's gain, with its bootstrap interval
    (x is seconds or teacher tokens, whatever the curves are on)."""
    s = cv.speedup(onpolicy, npd, fraction, finals)
    return {
        "fraction": fraction,
        "target_score": s.target,
        "ratio": s.value,
        "ci95": speedup_ci(onpolicy, npd, fraction=fraction, finals=finals),
        "onpolicy": s.onpolicy_s,
        "npd": s.npd_s,
        "reason": s.reason,
    }


def headline_lines(rep: dict[str, Any]) -> list[str]:
    """The bench report's headline numbers as lines (80 columns): the speedup with its CI and
    why it may be missing, the time and teacher-token ratios per target, the score gaps, and
    the variants that do not learn."""

    def ci(key: str) -> str:
        c = rep.get(f"{key}_ci95")
        return f" (95% CI [{c[0]:.2f}, {c[1]:.2f}])" if c else ""

    sp = rep["speedup_vs_onpolicy"]
    untuned = " (untuned: the config's own lr and batch)" if rep.get("speedup_untuned") else ""
    why = f" — {rep['speedup_reason']}" if rep.get("speedup_reason") else ""
    shown = f"{sp:.2f}×" if sp is not None else "n/a"
    lines = [f"speedup vs onpolicy: {shown}{ci('speedup')}{untuned}{why}"]
    for key, unit in (("speedups", "time"), ("teacher_token_ratios", "teacher tokens")):
        for x in rep.get(key) or []:
            c = x["ci95"]
            ratio = f"{x['ratio']:.2f}×" if x["ratio"] is not None else "n/a"
            lines.append(
                f"  {unit} to {x['fraction']:.0%} of onpolicy's gain ({x['target_score']:.1f}): "
                f"{ratio}" + (f" [{c[0]:.2f}, {c[1]:.2f}]" if c else "")
            )
    for key in ("npd_minus_sft_points", "npd_minus_onpolicy_points"):
        if rep[key] is not None:
            lines.append(f"{key}: {rep[key]:+.2f}{ci(key)}")
    flat = [n for n, v in rep["variants"].items() if v.get("learns") is False]
    if flat:
        lines.append(f"does not learn (no grid point above its start by 1 SE): {', '.join(flat)}")
    rule = rep.get("ablations_vs_npd") or {}
    if rule:
        above = [f"{n} ({a['margin']:+.2f})" for n, a in rule.items() if a["qualifies"]]
        lines.append(
            "ablations above npd by > 2 SE (confirm before a default): "
            + (", ".join(above) if above else "none")
        )
    return lines
