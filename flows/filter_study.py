"""``npd bench filter``: the pre-registered study of the Δ-IFD filter rules under staleness
(its cells and decision rule: :mod:`npd_core.bench.filter_study`).

Every cell is one NPD run through the same flow and clock as ``npd bench`` (rounds sized to its
budget by the probe), at the config's own lr and batch, and scores every view
(``compute_delta_ifd``) so that cells differ in the rule alone. A finished cell is saved at once
(``<out>/filter-study/<stage>.json``); running the stage again skips it, so a stage interrupted
by the end of a sitting resumes where it stopped.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from flows.env import finite
from flows.variants import run_npd
from npd_core.bench import curves as cv
from npd_core.bench import filter_stages as fst
from npd_core.bench import filter_study as fs
from npd_core.bench.harness import DEFAULT_BUDGET_S, SLACK, Hyper
from npd_core.bench.plan import BenchContext
from npd_core.config import load_config, merge


def run_cell(ctx: BenchContext, cell: fs.Cell, hyper: Hyper) -> dict[str, Any]:
    """One cell's NPD run, its curve within the cell's budget and its figures."""
    sub = replace(ctx, budget_s=ctx.budget_s * cell.budget_fraction)
    over = {
        "staleness": cell.staleness,
        "filter": {**fs.RULES[cell.rule], "compute_delta_ifd": True},
    }
    res = run_npd(sub, cell.seed, hyper, name=f"{cell.rule}-st{cell.staleness}", overrides=over)
    curve = cv.truncate([(p["wall_s"], p["score"]) for p in res.curve], sub.budget_s * (1 + SLACK))
    return {
        **asdict(cell),
        "budget_s": sub.budget_s,
        "run_id": res.run_id,
        "curve": [{"wall_s": t, "score": s} for t, s in curve],
        **fs.curve_figures(curve),
        **fs.cell_stats(ctx.out, res.run_id),
    }


def run_study(
    stage: str, out: Path, config: Path | None, budget_s: float | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run (or resume) one stage and write its JSON and plot; returns the report."""
    from flows.headline import open_bench, plan_bench
    from npd_core.bench.plots import rule_curves
    from tasks import tracking

    folder = out / "filter-study"
    saved = fst.load(folder / f"{stage}.json")
    cells = fst.stage_cells(stage, folder)
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
        fst.save(folder / f"{stage}.json", {"stage": stage, "cells": list(results.values())})
    done = [results[c.name] for c in cells]
    report = fst.report(stage, budget, hyper, done)
    title = f"npd bench filter ({stage}): staleness {fst.PLOT_STALENESS}, mean over seeds"
    png = rule_curves(fst.plotted_means(done), title, folder / f"{stage}.png")
    report["plot"] = str(png.resolve())
    fst.save(folder / f"{stage}.json", report)
    tracking.log_artifact(str(out), ctx.mlflow_parent, folder / f"{stage}.json")
    tracking.log_artifact(str(out), ctx.mlflow_parent, png)
    tracking.end_run(str(out), ctx.mlflow_parent)
    return finite(report)
