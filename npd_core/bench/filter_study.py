"""The pre-registered filter study of ``npd bench filter``: its cells, figures and decision rule.

Its grid, seeds, budgets and decision rule were fixed in the docs before it ran. Two stages sized
to a 2-core machine:

- *screen*: every rule × staleness {1, 4}, seed 0; staleness 1 at a quarter of the budget,
  staleness 4 at the full budget (a quarter gives 4–5 rounds, all from θ_0: no staleness);
- *confirm*: the two rules with the best mean screened score over staleness, plus the reference
  (``none`` keeping unfinished samples), × staleness {1, 2, 4} × 3 seeds at the full budget.

Every cell is one NPD run of the bench (``flows.filter_study`` runs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npd_core.bench import curves as cv
from npd_core.bench.stats import diff_ci, mean_ci

RULES: dict[str, dict[str, Any]] = {  # name → filter section
    "band": {"rule": "band"},
    "fence": {"rule": "fence", "k": 3.0},
    "upper": {"rule": "upper"},
    "lower": {"rule": "lower"},
    "none": {"rule": "none"},
    "none-keep": {"rule": "none", "drop_unfinished": False},
}
REFERENCE = "none-keep"
SCREEN_STALENESS = {1: 0.25, 4: 1.0}  # staleness → share of the budget
CONFIRM_STALENESS = (1, 2, 4)
CONFIRM_SEEDS = 3
CONFIRM_RULES = 2  # the best screened rules carried into confirm (the reference is added)
FINAL_EVALS = 3  # final score = mean of the last 3 evaluations
MIN_MEAN_DIFF = -1.0  # points: a default may not lose more than this at any staleness


@dataclass(frozen=True)
class Cell:
    rule: str
    staleness: int
    seed: int
    budget_fraction: float

    @property
    def name(self) -> str:
        return f"{self.rule}-st{self.staleness}-s{self.seed}"


def screen_cells() -> list[Cell]:
    return [Cell(r, st, 0, f) for st, f in SCREEN_STALENESS.items() for r in RULES]


def confirm_rules(screen: list[dict[str, Any]]) -> list[str]:
    """The two rules (reference aside) with the best mean screened final score over staleness
    (ties: the order of RULES), then the reference."""
    means = {
        r: float(np.mean([c["final_score"] for c in screen if c["rule"] == r]))
        for r in RULES
        if r != REFERENCE
    }
    best = sorted(means, key=lambda r: (-means[r], list(RULES).index(r)))[:CONFIRM_RULES]
    return [*best, REFERENCE]


def confirm_cells(rules: list[str]) -> list[Cell]:
    return [
        Cell(r, st, seed, 1.0)
        for seed in range(CONFIRM_SEEDS)
        for st in CONFIRM_STALENESS
        for r in rules
    ]


def curve_figures(curve: cv.Curve) -> dict[str, float]:
    """Final score (mean of the last FINAL_EVALS evaluations after θ_0, fewer if the run had
    fewer rounds) and the largest drop between consecutive evaluations (0 if it never fell)."""
    scores = [s for _, s in curve]
    rounds = scores[1:] or scores
    drops = [a - b for a, b in zip(scores, scores[1:], strict=False)]
    return {
        "final_score": float(np.mean(rounds[-FINAL_EVALS:])),
        "max_drop": float(max([0.0, *drops])),
    }


def decide(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The filter study's pre-registered decision rule, applied as written: a rule replaces the
    reference only if the Welch 95% CI of (rule − reference) final score lies above 0 at one
    staleness or more and its mean difference is ≥ −1 point at every staleness; among such rules
    the best mean over staleness wins; otherwise the reference is the default."""
    finals: dict[tuple[str, int], list[float]] = {}
    for c in cells:
        finals.setdefault((c["rule"], c["staleness"]), []).append(c["final_score"])
    staleness = sorted({st for _, st in finals})
    rules = sorted({r for r, _ in finals}, key=list(RULES).index)
    comparisons: dict[str, Any] = {}
    eligible: dict[str, float] = {}
    for r in rules:
        if r == REFERENCE:
            continue
        per = {}
        for st in staleness:
            a, b = finals.get((r, st), []), finals.get((REFERENCE, st), [])
            per[str(st)] = {
                "mean_diff": float(np.mean(a) - np.mean(b)) if a and b else None,
                "ci95": diff_ci(a, b),
            }
        above = any(x["ci95"] is not None and x["ci95"][0] > 0 for x in per.values())
        close = all(
            x["mean_diff"] is not None and x["mean_diff"] >= MIN_MEAN_DIFF for x in per.values()
        )
        comparisons[r] = {"by_staleness": per, "ci_above_zero": above, "never_below_1": close}
        if above and close:
            eligible[r] = float(np.mean([finals[(r, st)] for st in staleness]))
    winner = max(eligible, key=lambda r: eligible[r]) if eligible else REFERENCE
    return {
        "reference": REFERENCE,
        "comparisons": comparisons,
        "eligible": eligible,
        "default": winner,
    }


def summary(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rule, staleness): means over seeds and the seed interval of the final."""
    rows = []
    keys = sorted(
        {(c["rule"], c["staleness"]) for c in cells}, key=lambda k: (k[1], list(RULES).index(k[0]))
    )
    for rule, st in keys:
        group = [c for c in cells if (c["rule"], c["staleness"]) == (rule, st)]
        finals = [c["final_score"] for c in group]
        rows.append(
            {
                "rule": rule,
                "staleness": st,
                "seeds": len(group),
                "final_score": float(np.mean(finals)),
                "final_score_ci95": mean_ci(finals),
                "max_drop": float(np.mean([c["max_drop"] for c in group])),
                "kept_fraction": float(np.mean([c["kept_fraction"] for c in group])),
                "dropped_kl_share": float(np.mean([c["dropped_kl_share"] for c in group])),
                "rounds": float(np.mean([len(c["rounds"]) for c in group])),
            }
        )
    return rows


def cell_stats(out: Path, run_id: str) -> dict[str, Any]:
    """Per round: score, kept fraction, dropped KL share; over the run: kept fraction and the
    share of the forward-KL mass (Σ over samples) in dropped rows."""
    from npd_core.store import Store

    store = Store(out, create=False)
    rounds = store.query(
        "SELECT round, score, kept_fraction, dropped_kl_share FROM rounds WHERE run_id = ? "
        "ORDER BY round",
        [run_id],
    ).to_pylist()
    mass = store.query(
        "SELECT avg(kept::INT) kept, sum(CASE WHEN kept THEN 0 ELSE student_forward_kl_sum END)"
        " / sum(student_forward_kl_sum) dropped FROM samples WHERE run_id = ?",
        [run_id],
    ).to_pylist()[0]
    return {"rounds": rounds, "kept_fraction": mass["kept"], "dropped_kl_share": mass["dropped"]}


def mean_by_round(cells: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """Each round's score, averaged over ``cells``."""
    by: dict[int, list[float]] = {}
    for c in cells:
        for r in c["rounds"]:
            by.setdefault(r["round"], []).append(r["score"])
    return [(r, float(np.mean(v))) for r, v in sorted(by.items())]
