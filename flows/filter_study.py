"""``npd bench filter``: the pre-registered studies of the filter rules: screen and confirm under
staleness (cells and decision rule: :mod:`npd_core.bench.filter_study`), and the trained stage
with planted junk against a matched random drop (:mod:`npd_core.bench.filter_trained`).

Every cell is one NPD run through the same flow and clock as ``npd bench`` (rounds sized to its
budget by the probe), at the config's own lr and batch, and scores every view
(``compute_delta_ifd``) so that cells differ in the rule alone. A finished cell is saved at once
(``<out>/filter-study/<stage>.json``); running the stage again skips it, so a stage interrupted
by the end of a sitting resumes where it stopped (the trained stage: ``trained.json``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from flows.env import finite
from flows.variants import run_npd
from npd_core.bench import curves as cv
from npd_core.bench import filter_stages as fst
from npd_core.bench import filter_study as fs
from npd_core.bench import filter_trained as ft
from npd_core.bench.harness import DEFAULT_BUDGET_S, SLACK, Hyper
from npd_core.bench.plan import BenchContext
from npd_core.config import load_config, merge
from npd_core.errors import ConfigError


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


def _open(
    stage: str, out: Path, config: Path | None, budget_s: float, log: Callable[[str], None]
) -> tuple[BenchContext, Hyper]:
    """The bench context every cell of a stage runs in, and the hyperparameters they share."""
    from flows.headline import open_bench, plan_bench

    cfg = load_config(config)
    plan = plan_bench(
        out=out, config=config, quick=True, seeds=1, budget_s=None, names=["npd"], peers=[], log=log
    )
    plan = replace(plan, budget_s=budget_s, bench_id=f"filter-{stage}-{uuid.uuid4().hex[:4]}")
    ctx = open_bench(plan, log)
    ctx.config = merge(ctx.config, {"filter": {"compute_delta_ifd": True}})  # the probe too
    return ctx, Hyper(cfg.train.lr, cfg.train.rows_per_step, 1)


def _close(ctx: BenchContext, out: Path, files: list[Path]) -> None:
    from tasks import tracking

    for f in files:
        tracking.log_artifact(str(out), ctx.mlflow_parent, f)
    tracking.end_run(str(out), ctx.mlflow_parent)


def run_study(
    stage: str, out: Path, config: Path | None, budget_s: float | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run (or resume) one stage and write its JSON and plot; returns the report."""
    from npd_core.bench.plots import rule_curves

    folder = out / "filter-study"
    saved = fst.load(folder / f"{stage}.json")
    cells = fst.stage_cells(stage, folder)
    budget = budget_s or DEFAULT_BUDGET_S
    ctx, hyper = _open(stage, out, config, budget, log)
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
    _close(ctx, out, [folder / f"{stage}.json", png])
    return finite(report)


def run_trained_cell(
    ctx: BenchContext, cell: ft.TrainedCell, hyper: Hyper, match: dict[str, Any] | None
) -> dict[str, Any]:
    """One trained-stage cell's NPD run (a random cell copies ``match``'s kept shares), its
    curve within the budget, final score, kept shares and rounds."""
    over = cell.overrides(match["kept_by_round"] if match else None)
    res = run_npd(ctx, cell.seed, hyper, name=cell.name.rsplit("-s", 1)[0], overrides=over)
    curve = cv.truncate([(p["wall_s"], p["score"]) for p in res.curve], ctx.budget_s * (1 + SLACK))
    stats = fs.cell_stats(ctx.out, res.run_id)
    return {
        **asdict(cell),
        "name": cell.name,
        "matches": cell.matches,
        "budget_s": ctx.budget_s,
        "run_id": res.run_id,
        "curve": [{"wall_s": t, "score": s} for t, s in curve],
        "final_score": cv.final_score(curve, ctx.budget_s),
        "max_drop": fs.curve_figures(curve)["max_drop"],
        "rounds": stats["rounds"],
        "dropped_kl_share": stats["dropped_kl_share"],
        **ft.kept_stats(ctx.out, res.run_id, ft.in_steps(cell)),
    }


def run_trained(
    out: Path,
    config: Path | None,
    budget_s: float | None,
    junk: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run (or resume) the trained stage: its cells (the best two scores from the junk stage's
    JSON, ``junk``, default ``<out>/filter-study/junk.json``), then the decision, the per-cell
    table, a plot of the mean curves per junk condition and one of the final score per rule."""
    from npd_core.bench.plots import rule_curves, rule_finals

    folder = out / "filter-study"
    path = folder / "trained.json"
    junk_json = fst.load(junk or folder / "junk.json")
    if "summary" not in junk_json:
        raise ConfigError(
            f"{junk or folder / 'junk.json'}: no junk stage summary; run `npd bench filter "
            "--stage junk --run RUN_ID` first, or give its JSON with --junk (docs/filter-junk.json)"
        )
    best = ft.best_scores(junk_json["summary"])
    cells = ft.trained_cells(best)
    budget = budget_s or DEFAULT_BUDGET_S
    results = {c["name"]: c for c in fst.load(path).get("cells", [])}
    todo = sum(c.name not in results for c in cells)
    hours = todo * budget * ft.CELL_WALL / 3600
    log(
        f"filter study trained: {len(cells)} cells ({todo} to run) of {budget:.0f} s, "
        f"scores {', '.join(best)} and {ft.CONTROL}; about {hours:.1f} h"
    )
    ctx, hyper = _open("trained", out, config, budget, log)
    for cell in cells:
        if cell.name in results:
            continue
        log(f"filter study trained: {cell.name} ({len(results) + 1}/{len(cells)})")
        match = results[cell.matches] if cell.matches else None
        results[cell.name] = run_trained_cell(ctx, cell, hyper, match)
        fst.save(path, {"stage": "trained", "cells": list(results.values())})
    done = [results[c.name] for c in cells]
    report = {
        "stage": "trained",
        "budget_s": budget,
        "hyperparameters": asdict(hyper),
        "junk_scores": best,
        "final_score_rule": ft.FINAL_RULE,
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "decision": ft.decide(done),
        "summary": ft.summary(done),
        "cells": done,
        "plot": {},
    }
    for cond in dict.fromkeys(c["junk"] for c in done):
        title = f"npd bench filter (trained, {cond}): staleness {ft.STALENESS}, mean over seeds"
        png = rule_curves(ft.plotted_means(done, cond), title, folder / f"trained-{cond}.png")
        report["plot"][cond] = str(png.resolve())
    title = f"npd bench filter (trained): staleness {ft.STALENESS}, final score per rule"
    png = rule_finals(report["summary"], title, folder / "trained-final.png")
    report["plot"]["final"] = str(png.resolve())
    fst.save(path, report)
    _close(ctx, out, [path, *(Path(p) for p in report["plot"].values())])
    return finite(report)
