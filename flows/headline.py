"""``npd bench``: NPD against its baselines and its own ablations, on one wall-clock budget each.

This module plans a bench (the config, the variants, the world, the search grid), runs it as
Prefect work (:mod:`flows.variants`), and reports it: JSON, plot, MLflow and two Rich tables. The
rules every variant runs under are :mod:`npd_core.bench.harness`; the clock, the search, the round
sizing and the statistics are :mod:`npd_core.bench.clock`, ``search``, ``sizing`` and ``stats``.
What a bench finished is saved as it goes (:mod:`npd_core.bench.progress`): ``--resume BENCH_ID``
runs the rest.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from flows.env import finite, prefect_env
from flows.variants import peer_variant, variants
from npd_core.bench import plan as bench_plan
from npd_core.bench import search as sr
from npd_core.bench.cost import cost_lines
from npd_core.bench.harness import Hyper, checkpoint_times
from npd_core.bench.machine import machine
from npd_core.bench.plan import BenchContext, BenchPlan, make_report
from npd_core.bench.progress import Progress
from npd_core.bench.stats import headline_lines

err = Console(stderr=True)


def run_bench(plan: BenchPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the benchmark ``plan`` settles (what a resumed one left); return its JSON object
    (also in ``<out>/<id>/``). Its progress is saved after the search and after each run."""
    folder = plan.out / plan.bench_id
    if plan.resume:
        progress = Progress.resume(folder, plan.knobs())
        done = sum(map(len, progress.results.values()))
        log(f"resuming {plan.bench_id} (attempt {progress.attempt}): {done} runs finished")
    else:
        progress = Progress(folder, plan.knobs(), plan.started)
    progress.machines.append({"attempt": progress.attempt, **machine()})
    progress.save()
    ctx = open_bench(plan, log)
    ctx.attempt = progress.attempt
    ctx.calibration = progress.calibration  # the probes add to them, and ctx.results to these
    ctx.results = progress.results
    if progress.chosen is None:
        progress.chosen, progress.search_scores = search(ctx, plan, progress)
        progress.save()
    chosen = progress.chosen
    run_variants(ctx, plan, chosen, progress)
    from tasks import tracking

    uri = tracking.tracking_uri(ctx.out)
    report = make_report(ctx, plan, chosen, progress.search_scores, uri)
    report["machines"] = progress.machines  # one per attempt: which ran where
    return publish(ctx, report, progress.started)


def search(
    ctx: BenchContext, plan: BenchPlan, progress: Progress
) -> tuple[dict[str, Hyper], dict[str, list[dict[str, Any]]]]:
    """``npd_core.bench.search`` over the plan's grid, each point a short run of the method's
    variant (seed 0, ``SEARCH_FRACTION`` of the budget, scored once at its end), its score
    saved in ``progress`` as it finishes (a resumed bench replays them)."""
    budget = ctx.budget_s * sr.SEARCH_FRACTION

    def score(method: str, h: Hyper, k: int) -> float:
        sub = replace(ctx, budget_s=budget, eval_at=[budget], tag=f"search{k}-")
        run = plan.methods[method].run
        key = f"{method}/{k}/{json.dumps(asdict(h), sort_keys=True)}"
        return progress.scored(key, lambda: run(sub, 0, h).curve[-1]["score"])

    return sr.search(plan.methods, score, plan.base, plan.grid, ctx.log, plan.recorded)


def plan_bench(**kw: Any) -> BenchPlan:
    """:func:`npd_core.bench.plan.plan_bench` over the built-in variants and the peers."""
    return bench_plan.plan_bench(**kw, registry=variants, peer=peer_variant)


def open_bench(plan: BenchPlan, log: Callable[[str], None]) -> BenchContext:
    """The bench's MLflow parent run (every variant's run nests under it) and the context the
    runners share; the baselines' checkpoints split the budget evenly."""
    from tasks import tracking

    knobs = {k: v for k, v in plan.knobs().items() if k not in ("config_digest", "paths")}
    config = plan.cfg.model_dump(mode="json")
    parent = tracking.start_run(str(plan.out), plan.bench_id, "bench", {**knobs, "config": config})
    eval_at = checkpoint_times(plan.budget_s)
    ctx = BenchContext(
        plan.out, plan.bench_id, plan.paths, config, plan.budget_s, eval_at, parent, log
    )
    log(
        f"bench {plan.bench_id}: {len(plan.selected)} variants, {plan.budget_s:.0f} s each, "
        f"grid of {len(plan.points)}"
    )
    return ctx


def run_variants(
    ctx: BenchContext, plan: BenchPlan, chosen: dict[str, Hyper], progress: Progress
) -> None:
    """Every selected variant with its method's searched hyperparameters: ``--seeds`` seeds for
    the main ones, one for the others, those not finished yet; each result goes to
    ``progress.results`` and is saved at once."""
    for v in plan.selected:
        done = progress.results.setdefault(v.name, [])
        for seed in range(len(done), plan.n_seeds if v.main else 1):
            res = v.run(ctx, seed, chosen[v.method])
            done.append(res)
            progress.save()
            ctx.log(
                f"{v.name} seed {seed}: {res.curve[0]['score']:.2f} → "
                f"{res.curve[-1]['score']:.2f} in {res.wall_s:.0f} s"
            )


def publish(ctx: BenchContext, report: dict[str, Any], t_start: float) -> dict[str, Any]:
    """Plot the curves, write ``bench.json`` beside the plot, log both and the headline numbers
    to the parent MLflow run and close it; returns the report as strict JSON."""
    from npd_core.bench.plots import bench_curves
    from tasks import tracking

    out, parent = ctx.out, ctx.mlflow_parent
    folder = out / ctx.bench_id
    folder.mkdir(parents=True, exist_ok=True)
    table = report["variants"]
    by_tokens = {
        n: [(p["teacher_tokens"], p["score"]) for p in t["curve_teacher_tokens"]]
        for n, t in table.items()
        if t.get("curve_teacher_tokens")
    }
    png = bench_curves(
        {n: [(p["wall_s"], p["score"]) for p in t["curve"]] for n, t in table.items()},
        report,
        folder / "bench.png",
        by_tokens or None,
    )
    report["plot"] = str(png.resolve())
    report["wall_s"] = time.time() - t_start
    (folder / "bench.json").write_text(json.dumps(finite(report), indent=1))
    tracking.log_artifact(str(out), parent, png)
    tracking.log_artifact(str(out), parent, folder / "bench.json")
    tracking.log_metrics(
        str(out),
        parent,
        {k: v for k, v in report.items() if isinstance(v, float) and k != "budget_s"},
    )
    tracking.end_run(str(out), parent)
    return finite(report)


def _count(x: float) -> str:
    """1234567 → '1.23M': token counts that fit a narrow column."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


# stage → its column header in the cost table
STAGES = {
    "generate": "gen",
    "score": "score",
    "filter": "filt",
    "pack": "pack",
    "train": "train",
    "evaluate": "eval",
}


def print_report(rep: dict[str, Any]) -> None:
    """Two tables on stderr, each narrow enough for an 80-column terminal: the scores, then
    where each variant's time and tokens went."""
    scores = Table(
        title=f"npd bench {rep['bench_id']}: {rep['budget_s']:.0f} s per variant, "
        f"held-out exact match on {rep['held_out_size']}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    width = max(map(len, rep["variants"]))
    scores.add_column("variant", min_width=width, no_wrap=True)
    for col in ("seeds", "score", "95% CI", "wall s", "lr", "batch"):
        scores.add_column(col, justify="right")
    cost = Table(
        title="seconds by stage (evaluate is off the clock) and tokens",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    cost.add_column("variant", min_width=width, no_wrap=True)
    for col in (*STAGES.values(), "train tok", "gen tok"):
        cost.add_column(col, justify="right")
    for name, v in rep["variants"].items():
        ci = v["final_score_ci95"]
        h = v["hyperparameters"]
        scores.add_row(
            name,
            str(v["seeds"]),
            f"{v['final_score']:.1f}",
            f"{ci[0]:.1f}–{ci[1]:.1f}" if ci else "-",
            f"{v['wall_s']:.0f}",
            f"{h['lr']:.3g}",
            str(Hyper(**h).batch(v["method"])),
        )
        sec = v["stage_seconds"]
        cost.add_row(
            name,
            *(f"{sec[s]:.0f}" if s in sec else "-" for s in STAGES),
            _count(v["train_tokens"]),
            _count(v["generated_tokens"]),
        )
    err.print(scores)
    err.print(cost)
    for line in [*headline_lines(rep), *cost_lines(rep)]:
        err.print(line)
    err.print(f"plot: {rep['plot']}")
    err.print(f"MLflow: {rep['mlflow_uri']} (run {rep['mlflow_run_id']})")


def main(as_json: bool, **kw: Any) -> None:
    """``npd bench`` (the callback of ``bench_app``)."""
    prefect_env(kw["out"])

    def log(m: str) -> None:
        err.print(m, markup=False, highlight=False)

    rep = run_bench(plan_bench(**kw, log=log), log)
    if as_json:
        sys.stdout.write(json.dumps(rep, allow_nan=False) + "\n")
    else:
        print_report(rep)
