"""What one ``npd bench`` runs and what it reports, as plain data: the variants, the context
their runners share, the plan settled before anything runs, and the report built from the
seeds' results (the flows run the variants as Prefect work and render the report)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from npd_core.bench import search as sr
from npd_core.bench import sizing
from npd_core.bench.cost import in_run
from npd_core.bench.harness import DEFAULT_BUDGET_S, QUICK_FRACTION, Hyper, VariantResult
from npd_core.bench.machine import machine
from npd_core.bench.stats import ablations_vs_npd, headline_numbers, learns, summarize
from npd_core.config import NPDConfig, load_config
from npd_core.errors import ConfigError
from npd_core.modelio import file_digest
from npd_core.pipeline.spec import RunSpec

MAIN = ("npd", "sft", "onpolicy")  # the variants --quick runs (and the ones with --seeds)


@dataclass
class BenchContext:
    """Everything a runner needs; runners build their RunSpec with ``spec``."""

    out: Path
    bench_id: str
    paths: dict[str, str]  # teacher, student, train_prompts, eval_prompts
    config: dict[str, Any]  # base NPDConfig dump; variants override parts of it
    budget_s: float
    eval_at: list[float]  # clock times of the baselines' held-out checkpoints
    mlflow_parent: str  # the bench's MLflow run: every variant's run nests under it
    log: Callable[[str], None]
    calibration: dict[str, dict[str, sizing.Probe]] = field(default_factory=dict)  # by batch
    results: dict[str, list[VariantResult]] = field(default_factory=dict)  # done so far
    tag: str = ""  # run-id infix: "" for the main runs, "search-…" for the grid search
    attempt: int = 0  # resumed benches (``--resume``): their runs' ids say which attempt ran them

    def spec(self, name: str, seed: int, config: dict[str, Any]) -> RunSpec:
        """A RunSpec of this bench's world for ``config`` (validated), with its own run id."""
        label = f"{self.tag}{name}-s{seed}"
        cfg = NPDConfig.model_validate({**config, "seed": seed, "name": label})
        run_id = f"{self.bench_id}-{f'a{self.attempt}-' if self.attempt else ''}{label}"
        return RunSpec(str(self.out), run_id, cfg.model_dump(mode="json"), **self.paths)


Runner = Callable[[BenchContext, int, Hyper], VariantResult]


@dataclass(frozen=True)
class Variant:
    """A benchmark variant. ``method`` names whose searched hyperparameters it runs with
    ("npd", "sft", "onpolicy"; a peer usually takes "onpolicy"'s); ``main`` variants run
    ``--seeds`` seeds, the others one."""

    name: str
    method: str
    run: Runner
    main: bool = False


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
    world: str = ""  # ``world_digest`` of ``paths``: a resume on other weights is refused

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
            "world_digest": self.world,
        }


def world_digest(paths: dict[str, str]) -> str:
    """sha256 over the bytes of the world's files (the models' weights and configs, the prompt
    files): a bench carried to another machine (its ``progress.json`` copied) resumes only on
    the same weights, a rebuilt world included; a path that is not on disk counts by name."""
    parts = []
    for key in sorted(paths):
        path = Path(paths[key])
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        parts += [
            f"{key}/{f.relative_to(path) if path.is_dir() else f.name}:"
            + (file_digest(f) if f.is_file() else "absent")
            for f in files
        ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


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
    registry: Callable[[NPDConfig], dict[str, Variant]],
    peer: Callable[[str], Variant],
) -> BenchPlan:
    """Load the config, pick the variants (unknown names are a ConfigError), resolve the world
    (built or loaded) and lay the search grid around the config's own lr and batch size.
    ``resume``: the id of the bench to carry on (planned with the same options); ``registry``
    gives the built-in variants for a config, ``peer`` a ``--peers`` one by name."""
    from npd_core.data import read_prompts
    from npd_core.pipeline.resolve import resolve_spec, use_world

    started = time.time()
    cfg = load_config(config)
    use_world(cfg, world)  # the world's method settings first: the ablations are relative to them
    known = registry(cfg)
    chosen_names = names or (list(MAIN) if quick else list(known))
    unknown = [n for n in chosen_names if n not in known]
    if unknown:
        raise ConfigError(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    selected = [known[n] for n in chosen_names] + [peer(p) for p in peers]
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
        world=world_digest(paths),
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
    chosen: dict[str, Hyper],
    search_scores: dict[str, list[dict[str, Any]]],
    mlflow_uri: str,
) -> dict[str, Any]:
    """The bench's JSON object: the table, the headline numbers and how they were obtained."""
    from npd_core.data import read_prompts

    table = results_table(ctx, plan, chosen, search_scores)
    report = {
        "bench_id": plan.bench_id,
        "variants": table,
        **headline_numbers(table),
        "ablations_vs_npd": ablations_vs_npd(table, plan.held_out),
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
        "mlflow_uri": mlflow_uri,
    }
    return {**report, **in_run(report)}
