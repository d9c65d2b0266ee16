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
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from flows.env import finite, prefect_env
from flows.variants import MAIN, BenchContext, Variant, peer_variant, variants
from npd_core.bench import search as sr
from npd_core.bench.cost import cost_lines, in_run
from npd_core.bench.harness import DEFAULT_BUDGET_S, QUICK_FRACTION, Hyper, checkpoint_times
from npd_core.bench.machine import machine
from npd_core.bench.progress import Progress
from npd_core.bench.stats import headline_numbers, learns, summarize
from npd_core.config import NPDConfig, load_config
from npd_core.errors import ConfigError

err = Console(stderr=True)


# ---------------------------------------------------------------- the command
@dataclass(frozen=True)
class BenchPlan:
    """What one ``npd bench`` call runs, settled before anything runs: the config, the variants,
    the world's paths, the budget, the seeds and the search grid."""

    cfg: NPDConfig
    out: Path
    bench_id: str
    started: float  # time.time() when planning began (the report's wall_s counts from here)
    selected: list[Variant]  # in report order
    methods: dict[str, Variant]  # method → the variant whose runner the search runs
    paths: dict[str, str]  # teacher, student, train_prompts, eval_prompts
    budget_s: float
    n_seeds: int
    grid: dict[str, tuple[float, ...]]
    base: Hyper  # the config's own values (on-policy batch from the responses θ_0 writes)
    lengths: dict[str, float]  # mean prompt and θ_0 response tokens that sized that batch
    points: list[Hyper]
    held_out: int  # held-out prompts each checkpoint is scored on
    quick: bool
    resume: bool  # the bench ``bench_id`` ran before: run what it left unfinished
    recorded: dict[str, Hyper] = field(default_factory=dict)  # --quick: the last full bench's
    tuned: dict[str, str] = field(default_factory=dict)  # method → search, its file, or untuned

    def knobs(self) -> dict[str, Any]:
        """What a resumed bench must plan the same (also its MLflow run's params)."""
        return {
            "budget_s": self.budget_s,
            "quick": self.quick,
            "seeds": self.n_seeds,
            "grid": json.dumps(self.grid),
            "variants": ",".join(v.name for v in self.selected),
            "config_digest": self.cfg.digest(),
            "paths": self.paths,
        }


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
    ctx = open_bench(plan, log)
    ctx.attempt = progress.attempt
    ctx.calibration = progress.calibration  # the probes add to them, and ctx.results to these
    ctx.results = progress.results
    if progress.chosen is None:
        progress.chosen, progress.search_scores = search(ctx, plan)
        progress.save()
    chosen = progress.chosen
    run_variants(ctx, plan, chosen, progress)
    table = results_table(ctx, plan, chosen, progress.search_scores)
    report = make_report(ctx, plan, table, chosen, progress.search_scores)
    return publish(ctx, report, table, progress.started)


def search(
    ctx: BenchContext, plan: BenchPlan
) -> tuple[dict[str, Hyper], dict[str, list[dict[str, Any]]]]:
    """``npd_core.bench.search`` over the plan's grid, each point a short run of the method's
    variant (seed 0, ``SEARCH_FRACTION`` of the budget, scored once at its end)."""
    budget = ctx.budget_s * sr.SEARCH_FRACTION

    def score(method: str, h: Hyper, k: int) -> float:
        sub = replace(ctx, budget_s=budget, eval_at=[budget], tag=f"search{k}-")
        return plan.methods[method].run(sub, 0, h).curve[-1]["score"]

    return sr.search(plan.methods, score, plan.base, plan.grid, ctx.log, plan.recorded)


def plan_bench(
    *,
    out: Path,
    config: Path | None,
    quick: bool,
    seeds: int | None,
    budget_s: float | None,
    names: list[str] | None,
    peers: list[str],
    log: Callable[[str], None],
    world: str = "toy",
    resume: str | None = None,
) -> BenchPlan:
    """Load the config, pick the variants (unknown names are a ConfigError), resolve the world
    (built or loaded) and lay the search grid around the config's own lr and batch size.
    ``resume``: the id of the bench to carry on (planned with the same options)."""
    from npd_core.data import read_prompts
    from npd_core.pipeline.resolve import resolve_spec

    started = time.time()
    cfg = load_config(config)
    known = variants(cfg)
    chosen_names = names or (list(MAIN) if quick else list(known))
    unknown = [n for n in chosen_names if n not in known]
    if unknown:
        raise ConfigError(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    selected = [known[n] for n in chosen_names] + [peer_variant(p) for p in peers]
    bench_id = resume or f"bench-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    spec, _ = resolve_spec(cfg, out, bench_id, log=log, world=world)
    paths = {k: spec[k] for k in ("teacher", "student", "train_prompts", "eval_prompts")}
    lengths = sr.base_lengths(paths, cfg)
    base = sr.base_hyper(cfg, lengths["prompt_tokens"], lengths["response_tokens"])
    grid = sr.QUICK_GRID if quick else sr.GRID
    # --quick with the world's default config: the settings its last full bench chose
    recorded = sr.recorded_choice(world) if quick and config is None else None
    methods = {v.method: known.get(v.method, v) for v in selected}
    n_eval = len(read_prompts(paths["eval_prompts"]))
    return BenchPlan(
        cfg=cfg,
        out=out,
        bench_id=bench_id,
        started=started,
        selected=selected,
        methods=methods,
        paths=paths,
        budget_s=(budget_s or DEFAULT_BUDGET_S) * (QUICK_FRACTION if quick else 1.0),
        n_seeds=seeds or (1 if quick else 3),
        grid=grid,
        base=base,
        lengths=lengths,
        points=sr.grid_points(base, grid),
        held_out=min(n_eval, cfg.data.eval_size or n_eval),
        quick=quick,
        resume=resume is not None,
        recorded=recorded[0] if recorded else {},
        tuned=sr.tuning(methods, grid, recorded),
    )


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


def results_table(
    ctx: BenchContext,
    plan: BenchPlan,
    chosen: dict[str, Hyper],
    search_scores: dict[str, list[dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """One row per variant: its seeds summarized, with the hyperparameters it ran with, where
    they came from, and whether it learns (its grid points, if it is its method's own variant,
    and its seeds' mean final score against the warm start)."""
    table = {}
    for v in plan.selected:
        row = summarize(ctx.results[v.name], plan.budget_s)
        grid = [r["score"] for r in search_scores.get(v.method, [])] if v.name == v.method else []
        start = row["seed_curves"][0][0]["score"]
        table[v.name] = {
            **row,
            **learns(start, [row["final_score"], *grid], plan.held_out),
            "hyperparameters": asdict(chosen[v.method]),
            "tuned": plan.tuned[v.method],
            "method": v.method,
        }
    return table


def make_report(
    ctx: BenchContext,
    plan: BenchPlan,
    table: dict[str, dict[str, Any]],
    chosen: dict[str, Hyper],
    search_scores: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """The bench's JSON object: the table, the headline numbers and how they were obtained."""
    from npd_core.data import read_prompts
    from tasks import tracking

    report = {
        "bench_id": plan.bench_id,
        "variants": table,
        **headline_numbers(table),
        "seeds": {v.name: len(ctx.results[v.name]) for v in plan.selected},
        "held_out_size": plan.held_out,
        "train_prompts": len(read_prompts(plan.paths["train_prompts"])),
        "machine": machine(),
        "config": ctx.config,  # the bench's config (each variant's overrides are in settings)
        "paths": plan.paths,  # the world: teacher, student, prompts (the cost model's input)
        "grid": sr.search_report(
            plan.grid,
            plan.base,
            plan.lengths,
            plan.budget_s,
            chosen,
            search_scores,
            plan.held_out,
            plan.tuned,
        ),  # fmt: skip
        "budget_s": plan.budget_s,
        "eval_at": ctx.eval_at,
        "calibration": ctx.calibration,
        "quick": plan.quick,
        "out": str(ctx.out.resolve()),
        "mlflow_run_id": ctx.mlflow_parent,
        "mlflow_uri": tracking.tracking_uri(ctx.out),
    }
    return {**report, **in_run(report)}


def publish(
    ctx: BenchContext, report: dict[str, Any], table: dict[str, dict[str, Any]], t_start: float
) -> dict[str, Any]:
    """Plot the curves, write ``bench.json`` beside the plot, log both and the headline numbers
    to the parent MLflow run and close it; returns the report as strict JSON."""
    from npd_core.bench.plots import bench_curves
    from tasks import tracking

    out, parent = ctx.out, ctx.mlflow_parent
    folder = out / ctx.bench_id
    folder.mkdir(parents=True, exist_ok=True)
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

    def ci(key: str) -> str:
        c = rep.get(f"{key}_ci95")
        return f" (95% CI [{c[0]:.2f}, {c[1]:.2f}])" if c else ""

    sp = rep["speedup_vs_onpolicy"]
    untuned = " (untuned: the config's own lr and batch)" if rep.get("speedup_untuned") else ""
    err.print(
        f"speedup vs onpolicy: {f'{sp:.2f}×' if sp is not None else 'n/a'}{ci('speedup')}"
        + untuned
        + (f" — {rep['speedup_reason']}" if rep.get("speedup_reason") else "")
    )
    for key, unit in (("speedups", "time"), ("teacher_token_ratios", "teacher tokens")):
        for x in rep.get(key) or []:
            c = x["ci95"]
            shown = f"{x['ratio']:.2f}×" if x["ratio"] is not None else "n/a"
            err.print(
                f"  {unit} to {x['fraction']:.0%} of onpolicy's gain ({x['target_score']:.1f}): "
                f"{shown}" + (f" [{c[0]:.2f}, {c[1]:.2f}]" if c else "")
            )
    for key in ("npd_minus_sft_points", "npd_minus_onpolicy_points"):
        if rep[key] is not None:
            err.print(f"{key}: {rep[key]:+.2f}{ci(key)}")
    flat = [n for n, v in rep["variants"].items() if v.get("learns") is False]
    if flat:
        err.print(f"does not learn (no grid point above its start by 1 SE): {', '.join(flat)}")
    for line in cost_lines(rep):
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
