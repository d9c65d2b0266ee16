"""``npd bench``: NPD against its baselines and its own ablations, on one wall-clock budget each.

Fairness rules (fixed here and in the README before any comparison is looked at):

- every variant starts from the same warm-start student, with the same teacher, training prompts,
  held-out prompts and generation backend (our batched KV-cache sampler);
- every variant gets the same training clock, ``budget_s``; evaluation is off the clock (the
  baselines stop their clock between segments; NPD evaluates after its last round and its clock
  skips the time when evaluation, loading or writing was all that ran and the gaps between
  stages, see ``_npd_clock``); points past ``budget_s × (1 + SLACK)`` are dropped;
- the held-out score is taken at fixed clock times for the baselines (``eval_at``) and at every
  round boundary for NPD (a round is its natural checkpoint);
- learning rate and batch size come from one grid, searched the same way for each method (a
  short run per grid point, seed 0, best final score wins, ties to the grid's first point,
  which is the config's own values); ablations use NPD's choice. Batch size means packed rows per
  step for the packed methods and prompts per step for on-policy ones, the base value of the
  latter being the sequences that fit the same token capacity (``rows × max_seq_len`` over
  prompt + ``max_new_tokens``);
- NPD's rounds are sized to the budget from a two-round probe run at the same batch size (its
  stage seconds, and how much its overlapped round gained over running the two stages in
  order), so its cosine schedule ends where its budget does, as the baselines' does.

A variant is a name plus a runner ``(ctx, seed, hyper) -> VariantResult``; ``PEERS`` maps a
``--peers`` name to the module that provides one more (``npd bench --peers trl``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from flows.env import finite, prefect_env
from flows.variants import BenchContext, Hyper, Variant, VariantResult
from npd_core import iotime
from npd_core.bench import curves as cv
from npd_core.bench.cost import pipeline_clock
from npd_core.config import NPDConfig, load_config, merge
from npd_core.errors import ConfigError
from npd_core.method.train import round_steps
from npd_core.pipeline.spec import RunSpec

err = Console(stderr=True)

DEFAULT_BUDGET_S = 140.0  # the one setting: training seconds per variant (sizes everything else)
QUICK_FRACTION = 0.25  # --quick: a quarter of the budget, one seed, the three main variants
SEARCH_FRACTION = 0.5  # each grid point's search run (docs/bench-toy.json: 0.25, before the change)
CHECKPOINTS = 8  # held-out evaluations per baseline run before the final stretch (NPD: a round)…
TAIL_CHECKPOINTS = 4  # …and this many more in the last FINAL_TAIL of the budget (the final score)
SLACK = 0.05  # a checkpoint at most 5% past the budget still counts
GRID = {"lr": (1.0, 0.5, 2.0), "batch": (1.0, 0.5)}  # multipliers of the config's values
QUICK_GRID = {"lr": (1.0,), "batch": (1.0,)}
MAIN = ("npd", "sft", "onpolicy")
FILTER_RULES = ("none", "band", "fence")  # the ablations' rules: the filter study's confirm set
NPD_BENCH = {"eval": {"when": "end"}}  # NPD's evaluations after its last round: off its clock
LENGTH_SAMPLE = 256  # θ_0's answers to this many prompts size the on-policy batch
EXTEND = 2.0  # a grid edge extends by this factor of its multiplier…
MAX_EXTENSIONS = 2  # …at most this many times per axis
STEP_FACTORS = (0.5, 2.0)  # the steps-per-round ablations: half and twice the default's steps
PEERS = {"trl": "flows.peers:trl_variant"}  # --peers name → "module:function" returning a Variant


# ---------------------------------------------------------------- runners
def npd_rounds(cfg: NPDConfig, cal: dict[str, float], budget_s: float) -> int:
    """The most rounds whose predicted clock fits ``budget_s`` at the probe's speed.

    Producing a round takes P, learning it L. In order, R rounds take R·(P + L). Overlapped
    (staleness ≥ 1), the first producer and the last learner run alone and every round between
    takes M = max(P, L, (P + L) / g), g being the probe's overlap gain (the two stages share the
    cores): P + (R − 1)·M + L. Never more than the budget, since a checkpoint past it is dropped;
    the unused tail is under one round."""
    produce, learn, middle = _round_costs(cfg, cal)
    if middle is not None:
        return max(1, 1 + math.floor((budget_s - produce - learn) / middle))
    return max(1, math.floor(budget_s / (learn + produce)))


def predicted_clock(cfg: NPDConfig, cal: dict[str, float], rounds: int) -> float:
    """The clock ``rounds`` rounds take at the probe's speed (``npd_rounds``' model)."""
    produce, learn, middle = _round_costs(cfg, cal)
    return pipeline_clock(produce, learn, rounds, None if middle is None else cal["overlap_gain"])


def _round_costs(cfg: NPDConfig, cal: dict[str, float]) -> tuple[float, float, float | None]:
    """P, L and (overlapped runs) M of ``npd_rounds``."""
    samples = cfg.data.prompts_per_round * cfg.generate.n_per_prompt
    steps = round_steps(round(cal["rows_per_sample"] * samples), cfg.train)
    learn = steps * cfg.train.rows_per_step * cal["train_s_per_row"]
    produce = samples * cal["produce_s_per_sample"]
    if cfg.staleness > 0 and cfg.overlap:
        return produce, learn, max(produce, learn, (produce + learn) / cal["overlap_gain"])
    return produce, learn, None


def thread_options(cfg: NPDConfig) -> list[int]:
    """Threads per stage the probe tries: the config's own when it sets them; else half the
    cores (two overlapped stages side by side) and all of them (a stage that runs alone, or
    two that share them)."""
    if cfg.threads:
        return [cfg.threads]
    cores = os.cpu_count() or 1
    return sorted({max(1, cores // 2), cores})


def choose_threads(
    cfg: NPDConfig, cals: dict[str, dict[str, float]], budget_s: float
) -> tuple[int, dict[str, float]]:
    """The probed thread count that fits the most rounds in the budget (ties: the shorter
    predicted clock, then fewer threads), and its probe figures."""

    def rank(t: str) -> tuple[int, float, int]:
        rounds = npd_rounds(cfg, cals[t], budget_s)
        return (-rounds, predicted_clock(cfg, cals[t], rounds), int(t))

    best = min(cals, key=rank)
    return int(best), cals[best]


def run_npd(
    ctx: BenchContext, seed: int, hyper: Hyper, name: str = "npd", overrides: dict | None = None
) -> VariantResult:
    """NPD (``overrides`` make an ablation) through ``distill_flow``, rounds sized to the budget."""
    from flows.distill import distill_flow

    config = merge(
        ctx.config,
        {
            "train": {"lr": hyper.lr, "rows_per_step": hyper.rows_per_step},
            **NPD_BENCH,
            **(overrides or {}),
        },
    )
    threads, cal = choose_threads(
        NPDConfig.model_validate(config), calibrate(ctx, hyper), ctx.budget_s
    )
    config["threads"] = threads  # fixed for the run (its spec records it; a retry reuses it)
    config["rounds"] = npd_rounds(NPDConfig.model_validate(config), cal, ctx.budget_s)
    spec = ctx.spec(name, seed, config)
    res = distill_flow(spec)
    _nest(ctx, res["mlflow_run_id"])
    intervals = res["stage_intervals"]
    curve, covered, end = _npd_curve(res, ctx.budget_s * (1 + SLACK), _round_steps(spec))
    # seconds as the clock counts them (loads and writes left out), clipped where the curve ends
    stage_s: dict[str, float] = {}
    on_curve = {0, *(x["round"] for x in covered)}
    io = _io_spans(res)
    for stage, r, s, e in intervals:
        if stage == "evaluate":  # off the clock (at the end): those of the curve's checkpoints
            stage_s[stage] = stage_s.get(stage, 0.0) + (e - s if r in on_curve else 0.0)
        else:
            work = _between(s, e, io.get((stage, r), []))
            stage_s[stage] = stage_s.get(stage, 0.0) + sum(
                max(0.0, min(b, end) - a) for a, b in work
            )
    made = {r for stage, r, _, e in intervals if stage == "generate" and e <= end}
    cfg = spec.cfg
    return VariantResult(
        curve=curve,
        wall_s=curve[-1]["wall_s"],
        train_tokens=int(sum(x["train_tokens"] or 0 for x in covered)),
        generated_tokens=int(
            sum(x["generated_tokens"] for x in res["rounds"] if x["round"] in made)
        ),
        stage_seconds=stage_s,
        settings={
            "rounds": cfg.rounds,
            "steps_per_round": cfg.train.steps_per_round,
            "epochs_per_round": cfg.train.epochs_per_round,
            "optimizer_steps": _optimizer_steps(spec),
            "staleness": cfg.staleness,
            "filter": cfg.filter.rule,
            "drop_unfinished": cfg.filter.drop_unfinished,
            "threads": cfg.threads,
            "prompts_per_round": cfg.data.prompts_per_round,
        },
        run_id=spec.run_id,
        mlflow_run_id=res["mlflow_run_id"],
    )


def _npd_curve(
    res: dict[str, Any], limit_s: float, steps: dict[int, int]
) -> tuple[list[dict[str, float]], list[dict[str, Any]], float]:
    """An NPD run's curve on its clock, cut at ``limit_s``: θ_0, then every round whose
    checkpoint came in time, with the teacher tokens scored for the rounds it was trained on
    (every view, dropped samples included) and its optimizer steps (``steps`` by round). Also
    those rounds and the absolute time the last one ended (the totals stop there)."""
    intervals = res["stage_intervals"]
    clock, _ = _npd_clock(res)
    ends = {r: e for stage, r, _, e in intervals if stage == "train"}
    curve = [{"wall_s": 0.0, "score": res["start_score"], "teacher_tokens": 0, "steps": 0}]
    covered, teacher = [], 0
    end = min(s for _, _, s, _ in intervals)
    for x in res["rounds"]:
        teacher += x["teacher_tokens"]
        wall = clock(ends[x["round"]])
        if wall > limit_s:
            break
        point = {"wall_s": wall, "score": x["score"], "teacher_tokens": teacher}
        curve.append({**point, "steps": steps[x["round"]]})
        covered.append(x)
        end = ends[x["round"]]
    return curve, covered, end


def _npd_clock(res: dict[str, Any]) -> tuple[Callable[[float], float], float]:
    """An NPD run's training clock and its reading when the last non-evaluation stage ended.
    It runs while a stage computes: not while evaluation or loading and writing (models,
    checkpoints, Parquet: ``io_intervals``) are all that runs, nor between stages; the
    baselines' clocks leave out the same."""
    intervals = res["stage_intervals"]
    io = _io_spans(res)
    pieces: list[tuple[float, float, bool]] = []
    for stage, r, s, e in intervals:
        if stage == "evaluate":
            pieces.append((s, e, True))
            continue
        spans = io.get((stage, r), [])
        pieces += [(a, b, True) for a, b in spans]
        pieces += [(a, b, False) for a, b in _between(s, e, spans)]
    clock = cv.paused_clock(pieces)
    return clock, clock(max(e for stage, _, _, e in intervals if stage != "evaluate"))


def _between(s: float, e: float, spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``[s, e)`` less the disjoint sorted ``spans``."""
    out, at = [], s
    for a, b in spans:
        if a > at:
            out.append((at, min(a, e)))
        at = max(at, b)
    if at < e:
        out.append((at, e))
    return [(a, b) for a, b in out if b > a]


def _work_seconds(res: dict[str, Any]) -> dict[tuple[str, int], float]:
    """Each stage's seconds less its loads and writes, by (stage, round)."""
    io = {k: sum(e - s for s, e in v) for k, v in _io_spans(res).items()}
    return {(st, r): e - s - io.get((st, r), 0.0) for st, r, s, e in res["stage_intervals"]}


def _io_spans(res: dict[str, Any]) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """A run's load-and-write spans (``io_intervals``) by (stage, round), merged."""
    io: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for stage, r, s, e in res.get("io_intervals", []):
        io.setdefault((stage, r), []).append((s, e))
    return {k: iotime.merged(v) for k, v in io.items()}


def _optimizer_steps(spec: RunSpec) -> int:
    """Optimizer steps of an NPD run so far (its last checkpoint's step)."""
    q = "SELECT coalesce(max(step), 0) FROM checkpoints WHERE run_id = ?"
    return int(spec.store.query(q, [spec.run_id]).column(0)[0].as_py())


def _round_steps(spec: RunSpec) -> dict[int, int]:
    """An NPD run's optimizer steps at the end of each round (its checkpoints' steps)."""
    q = "SELECT round, step FROM checkpoints WHERE run_id = ?"
    t = spec.store.query(q, [spec.run_id])
    return dict(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True))


def _nest(ctx: BenchContext, mlflow_run: str) -> None:
    """Show an NPD run (its flow opens its own MLflow run) under the bench's parent run."""
    from tasks.baselines import nest_run

    nest_run.fn(str(ctx.out), mlflow_run, ctx.mlflow_parent)


def run_sft(ctx: BenchContext, seed: int, hyper: Hyper) -> VariantResult:
    """Sequence-level KD through ``sft_flow``."""
    from flows.baselines import sft_flow
    from npd_core.baselines.sft import sft_config

    config = merge(ctx.config, {"train": {"lr": hyper.lr, "rows_per_step": hyper.rows_per_step}})
    spec = ctx.spec("sft", seed, sft_config(config))
    res = sft_flow(spec, ctx.eval_at, ctx.mlflow_parent)
    return _baseline_result(spec, res, {"teacher_answers": "greedy, every training prompt"})


def run_onpolicy(ctx: BenchContext, seed: int, hyper: Hyper) -> VariantResult:
    """Synchronous on-policy distillation through ``onpolicy_flow``."""
    from flows.baselines import onpolicy_flow

    config = merge(ctx.config, {"train": {"lr": hyper.lr}})
    spec = ctx.spec("onpolicy", seed, config)
    res = onpolicy_flow(spec, ctx.eval_at, hyper.prompts_per_step, ctx.mlflow_parent)
    return _baseline_result(spec, res, {"prompts_per_step": hyper.prompts_per_step})


def _baseline_result(spec: RunSpec, res: dict[str, Any], extra: dict[str, Any]) -> VariantResult:
    settings = {"optimizer_steps": res["steps"], "lr_horizon_steps": res["total_steps"], **extra}
    return VariantResult.from_flow(res, settings, spec.run_id)


def variants(cfg: NPDConfig) -> dict[str, Variant]:
    """The built-in variants: the three main ones, then NPD's ablations."""
    ablations = {
        **filter_ablations(cfg),
        "staleness-0": {"staleness": 0},
        "staleness-2": {"staleness": 2},
        **{f"steps-x{f:g}": _scaled_steps(cfg, f) for f in STEP_FACTORS},
    }
    out = {
        "npd": Variant("npd", "npd", run_npd, main=True),
        "sft": Variant("sft", "sft", run_sft, main=True),
        "onpolicy": Variant("onpolicy", "onpolicy", run_onpolicy, main=True),
    }
    for name, over in ablations.items():
        out[name] = Variant(name, "npd", partial(run_npd, name=name, overrides=over))
    return out


def filter_ablations(cfg: NPDConfig) -> dict[str, dict[str, Any]]:
    """The filter settings the config does not use: each of ``FILTER_RULES`` but its own rule,
    and the other choice of ``drop_unfinished`` (the filter study's default is rule ``none``
    keeping unfinished samples, so by default these are band, fence and drop-unfinished)."""
    out: dict[str, dict[str, Any]] = {
        f"filter-{rule}": {"filter": {"rule": rule}}
        for rule in FILTER_RULES
        if rule != cfg.filter.rule
    }
    flip = not cfg.filter.drop_unfinished
    out["drop-unfinished" if flip else "keep-unfinished"] = {"filter": {"drop_unfinished": flip}}
    return out


def _scaled_steps(cfg: NPDConfig, factor: float) -> dict[str, Any]:
    """A round of ``factor`` × the default's optimizer steps: a round takes
    min(steps_per_round, epochs_per_round × its rows ÷ rows_per_step) steps, so both bounds
    scale (on the toy the epoch bound is the one that binds)."""
    t = cfg.train
    return {
        "train": {
            "steps_per_round": max(1, round(t.steps_per_round * factor)),
            "epochs_per_round": t.epochs_per_round * factor,
        }
    }


def peer_variant(name: str) -> Variant:
    """The ``--peers`` variant ``name`` from its module (an optional extra)."""
    from npd_core.baselines.peers import require

    require(name)
    target = PEERS.get(name)
    module, _, attr = (target or "").partition(":")
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--peers {name}: {target} cannot be loaded ({e})") from None


# ---------------------------------------------------------------- search, calibration
def base_hyper(cfg: NPDConfig, prompt_tokens: float, response_tokens: float) -> Hyper:
    """The config's own values; on-policy prompts fill the packed rows' token capacity, at the
    mean prompt and response lengths (``response_tokens``: what θ_0 writes, not the cap)."""
    per_row = cfg.pack.max_seq_len / (prompt_tokens + response_tokens)
    rows = cfg.train.rows_per_step
    return Hyper(cfg.train.lr, rows, max(1, round(rows * per_row)))


def response_tokens(paths: dict[str, str], prompts: list[list[int]], cfg: NPDConfig) -> float:
    """Mean length (EOS included) of θ_0's answers to the first ``LENGTH_SAMPLE`` training
    prompts, sampled with the run's settings: the on-policy batch is sized from it."""
    from npd_core.method.generate import generate
    from npd_core.models import load_model, load_tokenizer, use_bf16
    from npd_core.seeds import seed_for

    tok = load_tokenizer(paths["student"])
    sample = prompts[:LENGTH_SAMPLE]
    g = cfg.generate
    gens = generate(
        load_model(paths["student"]),
        sample,
        n_per_prompt=1,
        max_new_tokens=g.max_new_tokens,
        eos_ids={tok.eos_token_id},
        pad_id=tok.pad_token_id,
        temperature=g.temperature,
        top_p=g.top_p,
        seeds=[[seed_for(cfg.seed, "bench-lengths", None, i)] for i in range(len(sample))],
        batch_size=g.batch_size,
        bf16=use_bf16(cfg.models.bf16),
    )
    return float(np.mean([len(x[0].token_ids) for x in gens]))


def grid_points(base: Hyper, grid: dict[str, tuple[float, ...]]) -> list[Hyper]:
    """Every (lr, batch) multiplier pair, the base point first."""
    return [scaled(base, a, b) for b in grid["batch"] for a in grid["lr"]]


def calibrate(ctx: BenchContext, hyper: Hyper) -> dict[str, dict[str, float]]:
    """The probe's figures at each of ``thread_options`` threads per stage, by thread count
    (``{"1": …, "2": …}``; once per batch size)."""
    key = str(hyper.rows_per_step)
    if key not in ctx.calibration:
        cfg = NPDConfig.model_validate(ctx.config)
        ctx.calibration[key] = {str(t): _probe(ctx, hyper, t) for t in thread_options(cfg)}
    return ctx.calibration[key]


def _probe(ctx: BenchContext, hyper: Hyper, threads: int) -> dict[str, float]:
    """Two NPD rounds at ``threads`` per stage: seconds per packed row trained and per sample
    produced, each alone (round 1's producer, round 2's learner), and the overlap gain: how
    much faster the overlapped middle (round 1 learning while round 2 is produced) ran than
    the same two stages in order."""
    from flows.distill import distill_flow

    key = str(hyper.rows_per_step)
    config = merge(
        ctx.config,
        {
            "rounds": 2,
            "threads": threads,
            "train": {"lr": hyper.lr, "rows_per_step": hyper.rows_per_step},
            **NPD_BENCH,
        },
    )
    spec = replace(ctx, tag="").spec(f"probe-b{key}-t{threads}", 0, config)
    res = distill_flow(spec)
    _nest(ctx, res["mlflow_run_id"])
    work = _work_seconds(res)  # the same seconds the clock counts: loads and writes left out
    produce = sum(work[(s, 1)] for s in ("generate", "score", "filter", "pack"))
    learn = work[("train", 2)]
    _, total = _npd_clock(res)
    pack = spec.store.read_stage(spec.run_id, 1, "pack", "pack")
    n = res["rounds"][0]["n_generated"]
    cal = {
        "train_s_per_row": learn / max(1, _optimizer_steps(spec) / 2 * hyper.rows_per_step),
        "produce_s_per_sample": produce / n,
        "rows_per_sample": len(set(pack.column("row").to_pylist())) / n,
        "overlap_gain": min(2.0, max(1.0, (produce + learn) / max(1e-9, total - produce - learn))),
        "probe_s": total,
    }
    ctx.log(
        f"probe at batch {key}, {threads} threads: 2 NPD rounds in {total:.1f} s, "
        f"gain {cal['overlap_gain']:.2f}"
    )
    return cal


def search(
    ctx: BenchContext, methods: dict[str, Variant], base: Hyper, grid: dict[str, tuple[float, ...]]
) -> tuple[dict[str, Hyper], dict[str, list[dict[str, Any]]]]:
    """Per method, a short run (seed 0) at every grid point; the best final score wins (ties:
    the earlier point). Where the winner sits at the edge of an axis that has several values,
    that axis extends one step past it (× or ÷ ``EXTEND`` of the edge multiplier, the other
    axis at the winner's value), at most ``MAX_EXTENSIONS`` times per axis, until the choice is
    interior."""
    chosen: dict[str, Hyper] = {}
    scores: dict[str, list[dict[str, Any]]] = {}
    for method, variant in methods.items():
        chosen[method], scores[method] = _search_one(ctx, method, variant, base, grid)
    return chosen, scores


def _search_one(
    ctx: BenchContext,
    method: str,
    variant: Variant,
    base: Hyper,
    grid: dict[str, tuple[float, ...]],
) -> tuple[Hyper, list[dict[str, Any]]]:
    points = [(a, b) for b in grid["batch"] for a in grid["lr"]]
    if len(points) == 1:
        return scaled(base, *points[0]), []
    budget = ctx.budget_s * SEARCH_FRACTION
    tried: dict[tuple[float, float], float] = {}  # (lr mult, batch mult) → score, in run order
    rows: list[dict[str, Any]] = []

    def run(point: tuple[float, float], extension: bool) -> None:
        h = scaled(base, *point)
        sub = replace(ctx, budget_s=budget, eval_at=[budget], tag=f"search{len(tried)}-")
        score = variant.run(sub, 0, h).curve[-1]["score"]
        tried[point] = score
        rows.append({**asdict(h), "score": score, "extension": extension})
        ctx.log(f"search {method} lr={h.lr:.3g} batch={_batch(method, h)}: {score:.2f}")

    for p in points:
        run(p, extension=False)
    extensions = {0: 0, 1: 0}  # axis (0 lr, 1 batch) → extensions so far
    while True:
        order = list(tried)
        best = max(order, key=lambda k: (tried[k], -order.index(k)))
        nxt = _extension(best, grid, tried, extensions, base)
        if nxt is None:
            return scaled(base, *best), rows
        extensions[nxt[0]] += 1
        run(nxt[1], extension=True)


def _extension(
    best: tuple[float, float],
    grid: dict[str, tuple[float, ...]],
    tried: dict[tuple[float, float], float],
    extensions: dict[int, int],
    base: Hyper,
) -> tuple[int, tuple[float, float]] | None:
    """The next point past the edge ``best`` sits on, if an axis allows one more extension."""
    for axis, name in ((0, "lr"), (1, "batch")):
        if len(grid[name]) < 2 or extensions[axis] >= MAX_EXTENSIONS:
            continue
        values = sorted({k[axis] for k in tried})
        if best[axis] not in (values[0], values[-1]):
            continue
        m = best[axis] / EXTEND if best[axis] == values[0] else best[axis] * EXTEND
        point = (m, best[1]) if axis == 0 else (best[0], m)
        if point in tried or (axis == 1 and scaled(base, *point) == scaled(base, *best)):
            continue  # rounding gives the same batch: nothing left on this side
        return axis, point
    return None


def scaled(base: Hyper, lr_mult: float, batch_mult: float) -> Hyper:
    """``base`` with its lr and both batch sizes multiplied (batches rounded, at least 1)."""
    return Hyper(
        base.lr * lr_mult,
        max(1, round(base.rows_per_step * batch_mult)),
        max(1, round(base.prompts_per_step * batch_mult)),
    )


def _batch(method: str, h: Hyper) -> int:
    return h.rows_per_step if method in ("npd", "sft") else h.prompts_per_step


# ---------------------------------------------------------------- aggregation
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
        "final_score_ci95": cv.mean_ci(finals),
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


POINT_KEYS = ("wall_s", "score", "teacher_tokens", "steps")


def _idle(busy_s: float, clock_s: float) -> float:
    return min(1.0, max(0.0, 1.0 - busy_s / clock_s)) if clock_s > 0 else 1.0


def headline_numbers(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speedup over onpolicy and the score differences, each with its 95% interval."""

    def curves(name: str) -> list[cv.Curve]:
        c = table[name]["seed_curves"]
        return [[(p["wall_s"], p["score"]) for p in x] for x in c]

    def token_curves(name: str) -> list[cv.Curve] | None:
        c = table[name].get("seed_curves_teacher_tokens")
        return [[(p["teacher_tokens"], p["score"]) for p in x] for x in c] if c else None

    out: dict[str, Any] = {}
    if "npd" in table and "onpolicy" in table:
        on, nd, finals = curves("onpolicy"), curves("npd"), table["onpolicy"]["final_scores"]
        s = cv.speedup(on, nd, 1.0, finals)
        out.update(
            speedup_vs_onpolicy=s.value,
            speedup_reason=s.reason,
            speedup_target_score=s.target,
            onpolicy_s_to_target=s.onpolicy_s,
            npd_s_to_target=s.npd_s,
            speedup_ci95=cv.speedup_ci(on, nd, fraction=1.0, finals=finals),
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
    for other in ("sft", "onpolicy"):
        key = f"npd_minus_{other}_points"
        if "npd" in table and other in table:
            a, b = table["npd"]["final_scores"], table[other]["final_scores"]
            out[key] = float(np.mean(a) - np.mean(b))
            out[f"{key}_ci95"] = cv.diff_ci(a, b)
        else:
            out[key], out[f"{key}_ci95"] = None, None
    return out


def _at_target(
    onpolicy: list[cv.Curve], npd: list[cv.Curve], fraction: float, finals: list[float]
) -> dict[str, Any]:
    """onpolicy's x ÷ npd's x to ``fraction`` of onpolicy's gain, with its bootstrap interval
    (x is seconds or teacher tokens, whatever the curves are on)."""
    s = cv.speedup(onpolicy, npd, fraction, finals)
    return {
        "fraction": fraction,
        "target_score": s.target,
        "ratio": s.value,
        "ci95": cv.speedup_ci(onpolicy, npd, fraction=fraction, finals=finals),
        "onpolicy": s.onpolicy_s,
        "npd": s.npd_s,
        "reason": s.reason,
    }


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


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


def run_bench(plan: BenchPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the benchmark ``plan`` settles; return its JSON object (also in ``<out>/<id>/``)."""
    ctx = open_bench(plan, log)
    chosen, search_scores = search(ctx, plan.methods, plan.base, plan.grid)
    run_variants(ctx, plan, chosen)
    table = results_table(ctx, plan, chosen)
    report = make_report(ctx, plan, table, chosen, search_scores)
    return publish(ctx, report, table, plan.started)


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
) -> BenchPlan:
    """Load the config, pick the variants (unknown names are a ConfigError), resolve the world
    (built or loaded) and lay the search grid around the config's own lr and batch size."""
    from flows.spec import resolve_spec
    from npd_core.data import read_prompts
    from npd_core.models import format_prompts, load_tokenizer

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
    bench_id = f"bench-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    spec, _ = resolve_spec(cfg, out, bench_id, log=log, world=world)
    paths = {k: spec[k] for k in ("teacher", "student", "train_prompts", "eval_prompts")}
    tok = load_tokenizer(paths["student"])
    train = read_prompts(paths["train_prompts"])
    ids = format_prompts(tok, [p.prompt for p in train], cfg.data.chat_template)
    lengths = {
        "prompt_tokens": float(np.mean([len(x) for x in ids])),
        "response_tokens": response_tokens(paths, ids, cfg),
    }
    base = base_hyper(cfg, lengths["prompt_tokens"], lengths["response_tokens"])
    grid = QUICK_GRID if quick else GRID
    n_eval = len(read_prompts(paths["eval_prompts"]))
    return BenchPlan(
        cfg=cfg,
        out=out,
        bench_id=bench_id,
        started=started,
        selected=selected,
        methods={v.method: known.get(v.method, v) for v in selected},
        paths=paths,
        budget_s=(budget_s or DEFAULT_BUDGET_S) * (QUICK_FRACTION if quick else 1.0),
        n_seeds=seeds or (1 if quick else 3),
        grid=grid,
        base=base,
        lengths=lengths,
        points=grid_points(base, grid),
        held_out=min(n_eval, cfg.data.eval_size or n_eval),
        quick=quick,
    )


def checkpoint_times(budget_s: float) -> list[float]:
    """The baselines' evaluation times: every 1/CHECKPOINTS of the budget up to the final
    stretch (its last ``FINAL_TAIL``), then ``TAIL_CHECKPOINTS`` evenly spaced in it, ending
    at the budget, so the final score averages more than two points."""
    tail_from = (1 - cv.FINAL_TAIL) * budget_s
    early = [budget_s * k / CHECKPOINTS for k in range(1, CHECKPOINTS + 1)]
    step = (budget_s - tail_from) / TAIL_CHECKPOINTS
    late = [tail_from + step * k for k in range(1, TAIL_CHECKPOINTS + 1)]
    return [t for t in early if t <= tail_from] + late


def open_bench(plan: BenchPlan, log: Callable[[str], None]) -> BenchContext:
    """The bench's MLflow parent run (every variant's run nests under it) and the context the
    runners share; the baselines' checkpoints split the budget evenly."""
    from tasks import tracking

    knobs = {
        "budget_s": plan.budget_s,
        "quick": plan.quick,
        "seeds": plan.n_seeds,
        "grid": json.dumps(plan.grid),
        "variants": ",".join(v.name for v in plan.selected),
    }
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


def run_variants(ctx: BenchContext, plan: BenchPlan, chosen: dict[str, Hyper]) -> None:
    """Every selected variant with its method's searched hyperparameters: ``--seeds`` seeds for
    the main ones, one for the others; results go to ``ctx.results``."""
    for v in plan.selected:
        ctx.results[v.name] = []
        for seed in range(plan.n_seeds if v.main else 1):
            res = v.run(ctx, seed, chosen[v.method])
            ctx.results[v.name].append(res)
            ctx.log(
                f"{v.name} seed {seed}: {res.curve[0]['score']:.2f} → "
                f"{res.curve[-1]['score']:.2f} in {res.wall_s:.0f} s"
            )


def results_table(
    ctx: BenchContext, plan: BenchPlan, chosen: dict[str, Hyper]
) -> dict[str, dict[str, Any]]:
    """One row per variant: its seeds summarized, with the hyperparameters it ran with."""
    return {
        v.name: {
            **summarize(ctx.results[v.name], plan.budget_s),
            "hyperparameters": asdict(chosen[v.method]),
            "method": v.method,
        }
        for v in plan.selected
    }


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

    return {
        "bench_id": plan.bench_id,
        "variants": table,
        **headline_numbers(table),
        "seeds": {v.name: len(ctx.results[v.name]) for v in plan.selected},
        "held_out_size": plan.held_out,
        "train_prompts": len(read_prompts(plan.paths["train_prompts"])),
        "machine": machine(),
        "config": ctx.config,  # the bench's config (each variant's overrides are in settings)
        "paths": plan.paths,  # the world: teacher, student, prompts (the cost model's input)
        "grid": {
            "multipliers": {k: list(v) for k, v in plan.grid.items()},
            "points": [asdict(h) for h in plan.points],
            "base": asdict(plan.base),
            "base_lengths": plan.lengths,
            "extend": {"factor": EXTEND, "max_per_axis": MAX_EXTENSIONS},
            "search_budget_s": plan.budget_s * SEARCH_FRACTION if len(plan.points) > 1 else None,
            "chosen": {m: asdict(h) for m, h in chosen.items()},
            "scores": search_scores,
        },
        "budget_s": plan.budget_s,
        "eval_at": ctx.eval_at,
        "calibration": ctx.calibration,
        "quick": plan.quick,
        "out": str(ctx.out.resolve()),
        "mlflow_run_id": ctx.mlflow_parent,
        "mlflow_uri": tracking.tracking_uri(ctx.out),
    }


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
            str(_batch(v["method"], Hyper(**h))),
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
    err.print(
        f"speedup vs onpolicy: {f'{sp:.2f}×' if sp is not None else 'n/a'}{ci('speedup')}"
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
