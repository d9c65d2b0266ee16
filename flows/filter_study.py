"""``npd bench filter``: the pre-registered study of the Δ-IFD filter rules under staleness.

Its grid, seeds, budgets and decision rule were committed to the README ("Filter study") before
it ran. Two stages sized to a 2-core machine:

- *screen*: every rule × staleness {1, 4}, seed 0; staleness 1 at a quarter of the budget,
  staleness 4 at the full budget (a quarter gives 4–5 rounds, all from θ_0: no staleness);
- *confirm*: the two rules with the best mean screened score over staleness, plus the reference
  (``none`` keeping unfinished samples), × staleness {1, 2, 4} × 3 seeds at the full budget.

Every cell is one NPD run through the same flow and clock as ``npd bench`` (rounds sized to its
budget by the probe), at the config's own lr and batch, and scores every view
(``compute_delta_ifd``) so that cells differ in the rule alone. A finished cell is saved at once
(``<out>/filter-study/<stage>.json``); running the stage again skips it, so a stage interrupted
by the end of a sitting resumes where it stopped.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from flows.env import finite
from flows.headline import DEFAULT_BUDGET_S, SLACK, run_npd
from flows.variants import BenchContext, Hyper
from npd_core.bench import curves as cv
from npd_core.config import load_config, merge
from npd_core.errors import ConfigError

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
    """The README's decision rule, applied as written: a rule replaces the reference only if the
    Welch 95% CI of (rule − reference) final score lies above 0 at one staleness or more and its
    mean difference is ≥ −1 point at every staleness; among such rules the best mean over
    staleness wins; otherwise the reference is the default."""
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
                "ci95": cv.diff_ci(a, b),
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
                "final_score_ci95": cv.mean_ci(finals),
                "max_drop": float(np.mean([c["max_drop"] for c in group])),
                "kept_fraction": float(np.mean([c["kept_fraction"] for c in group])),
                "dropped_kl_share": float(np.mean([c["dropped_kl_share"] for c in group])),
                "rounds": float(np.mean([len(c["rounds"]) for c in group])),
            }
        )
    return rows


def _cell_stats(ctx: BenchContext, run_id: str) -> dict[str, Any]:
    """Per round: score, kept fraction, dropped KL share; over the run: kept fraction and the
    share of the forward-KL mass (Σ over samples) in dropped rows."""
    from npd_core.store import Store

    store = Store(ctx.out, create=False)
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


def run_cell(ctx: BenchContext, cell: Cell, hyper: Hyper) -> dict[str, Any]:
    sub = replace(ctx, budget_s=ctx.budget_s * cell.budget_fraction)
    over = {"staleness": cell.staleness, "filter": {**RULES[cell.rule], "compute_delta_ifd": True}}
    res = run_npd(sub, cell.seed, hyper, name=f"{cell.rule}-st{cell.staleness}", overrides=over)
    curve = cv.truncate([(p["wall_s"], p["score"]) for p in res.curve], sub.budget_s * (1 + SLACK))
    return {
        **asdict(cell),
        "budget_s": sub.budget_s,
        "run_id": res.run_id,
        "curve": [{"wall_s": t, "score": s} for t, s in curve],
        **curve_figures(curve),
        **_cell_stats(ctx, res.run_id),
    }


def run_study(
    stage: str, out: Path, config: Path | None, budget_s: float | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run (or resume) one stage and write its JSON and plot; returns the report."""
    from flows.headline import open_bench, plan_bench
    from npd_core.bench.plots import rule_curves
    from tasks import tracking

    folder = out / "filter-study"
    saved = _load(folder / f"{stage}.json")
    if stage == "screen":
        cells = screen_cells()
    else:
        screen = _load(folder / "screen.json")
        done = [c for c in screen.get("cells", []) if c["name"] in {x.name for x in screen_cells()}]
        if len(done) < len(screen_cells()):
            raise ConfigError(
                f"{folder / 'screen.json'}: the screen has {len(done)} of "
                f"{len(screen_cells())} cells; run `npd bench filter --stage screen` first"
            )
        cells = confirm_cells(confirm_rules(done))
    cfg = load_config(config)
    plan = plan_bench(
        out=out, config=config, quick=True, seeds=1, budget_s=None, names=["npd"], peers=[], log=log
    )
    budget = budget_s or DEFAULT_BUDGET_S
    plan = replace(plan, budget_s=budget, bench_id=f"filter-{stage}-{uuid.uuid4().hex[:4]}")
    ctx = open_bench(plan, log)
    ctx.config = merge(ctx.config, {"filter": {"compute_delta_ifd": True}})  # the probe too
    hyper = Hyper(cfg.train.lr, cfg.train.rows_per_step, 1)
    results = {c["name"]: c for c in saved.get("cells", [])}
    for cell in cells:
        if cell.name in results:
            continue
        log(f"filter study {stage}: {cell.name} ({len(results) + 1}/{len(cells)})")
        results[cell.name] = {"name": cell.name, **run_cell(ctx, cell, hyper)}
        _save(folder / f"{stage}.json", {"stage": stage, "cells": list(results.values())})
    done = [results[c.name] for c in cells]
    report: dict[str, Any] = {
        "stage": stage,
        "budget_s": budget,
        "hyperparameters": asdict(hyper),
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "summary": summary(done),
        "cells": done,
    }
    if stage == "screen":
        report["confirm_rules"] = confirm_rules(done)
    else:
        report["decision"] = decide(done)
    st4 = {
        rule: _mean_by_round([c for c in done if c["rule"] == rule and c["staleness"] == 4])
        for rule in dict.fromkeys(c["rule"] for c in done)
    }
    png = rule_curves(
        st4, f"npd bench filter ({stage}): staleness 4, mean over seeds", folder / f"{stage}.png"
    )
    report["plot"] = str(png.resolve())
    _save(folder / f"{stage}.json", report)
    tracking.log_artifact(str(out), ctx.mlflow_parent, folder / f"{stage}.json")
    tracking.log_artifact(str(out), ctx.mlflow_parent, png)
    tracking.end_run(str(out), ctx.mlflow_parent)
    return finite(report)


def _mean_by_round(cells: list[dict[str, Any]]) -> list[tuple[int, float]]:
    by: dict[int, list[float]] = {}
    for c in cells:
        for r in c["rounds"]:
            by.setdefault(r["round"], []).append(r["score"])
    return [(r, float(np.mean(v))) for r, v in sorted(by.items())]


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, data: dict[str, Any]) -> None:
    from npd_core.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(finite(data), indent=1))
