"""The variants of ``npd bench`` as Prefect work: a variant is a name plus a runner
``(ctx, seed, hyper) -> VariantResult`` that runs one seed as its own flow run, with its own
MLflow run under the bench's.

The built-in ones are NPD (through ``distill_flow``, its rounds sized to the budget by a probe),
the baselines (``sft_flow``, ``onpolicy_flow``) and NPD's ablations (:func:`variants`); ``PEERS``
maps a ``--peers`` name to the module that provides one more (``npd bench --peers trl``). The
rules they run under, their clock, search and statistics are in :mod:`npd_core.bench`.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from functools import partial
from typing import Any

from npd_core.bench import sizing
from npd_core.bench.ablations import ablations
from npd_core.bench.clock import StageTimes, npd_curve
from npd_core.bench.harness import NPD_BENCH, SLACK, Hyper, VariantResult
from npd_core.bench.plan import BenchContext, Variant
from npd_core.config import NPDConfig, merge
from npd_core.errors import ConfigError
from npd_core.pipeline.spec import RunSpec
from npd_core.store.lineage import steps_by_round

PEERS = {"trl": "flows.peers:trl_variant"}  # --peers name → "module:function" returning a Variant


# ---------------------------------------------------------------- runners
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
    threads, cal = sizing.choose_threads(
        NPDConfig.model_validate(config), calibrate(ctx, hyper), ctx.budget_s
    )
    config["threads"] = threads  # fixed for the run (its spec records it; a retry reuses it)
    config["rounds"] = sizing.npd_rounds(NPDConfig.model_validate(config), cal, ctx.budget_s)
    spec = ctx.spec(name, seed, config)
    res = distill_flow(spec)
    _nest(ctx, res.mlflow_run_id)
    steps = steps_by_round(spec.root, spec.run_id)
    c = npd_curve(res, ctx.budget_s * (1 + SLACK), steps)
    cfg = spec.cfg
    return VariantResult(
        curve=c.points,
        wall_s=c.points[-1]["wall_s"],
        train_tokens=c.train_tokens,
        generated_tokens=c.generated_tokens,
        stage_seconds=c.stage_seconds,
        settings={
            "rounds": cfg.rounds,
            "steps_per_round": cfg.train.steps_per_round,
            "epochs_per_round": cfg.train.epochs_per_round,
            "optimizer_steps": max(steps.values(), default=0),
            "staleness": cfg.staleness,
            "filter": cfg.filter.rule,
            "drop_unfinished": cfg.filter.drop_unfinished,
            "threads": cfg.threads,
            "prompts_per_round": cfg.data.prompts_per_round,
        },
        run_id=spec.run_id,
        mlflow_run_id=res.mlflow_run_id,
    )


def _nest(ctx: BenchContext, mlflow_run: str) -> None:
    """Show an NPD run (its flow opens its own MLflow run) under the bench's parent run."""
    from tasks.baselines import nest_run

    nest_run.fn(str(ctx.out), mlflow_run, ctx.mlflow_parent)


def calibrate(ctx: BenchContext, hyper: Hyper) -> dict[str, sizing.Probe]:
    """The probe's figures at each of ``sizing.thread_options`` threads per stage, by thread
    count (``{"1": …, "2": …}``; once per batch size)."""
    key = str(hyper.rows_per_step)
    if key not in ctx.calibration:
        cfg = NPDConfig.model_validate(ctx.config)
        ctx.calibration[key] = {str(t): _probe(ctx, hyper, t) for t in sizing.thread_options(cfg)}
    return ctx.calibration[key]


def _probe(ctx: BenchContext, hyper: Hyper, threads: int) -> sizing.Probe:
    """Two NPD rounds at ``threads`` per stage (``sizing.probe_figures``)."""
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
    _nest(ctx, res.mlflow_run_id)
    pack = spec.store.read_stage(spec.run_id, 1, "pack", "pack")
    rows = len(set(pack.column("row").to_pylist()))
    n = res.rounds[0].n_generated
    times = StageTimes.of(res)
    steps = max(steps_by_round(spec.root, spec.run_id).values(), default=0)
    cal = sizing.probe_figures(times, n, rows, steps, hyper.rows_per_step)
    ctx.log(
        f"probe at batch {key}, {threads} threads: 2 NPD rounds in {cal['probe_s']:.1f} s, "
        f"gain {cal['overlap_gain']:.2f}"
    )
    return cal


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


# ---------------------------------------------------------------- the registry
def variants(cfg: NPDConfig) -> dict[str, Variant]:
    """The built-in variants: the three main ones, then NPD's ablations."""
    out = {
        "npd": Variant("npd", "npd", run_npd, main=True),
        "sft": Variant("sft", "sft", run_sft, main=True),
        "onpolicy": Variant("onpolicy", "onpolicy", run_onpolicy, main=True),
    }
    for name, over in ablations(cfg).items():
        out[name] = Variant(name, "npd", partial(run_npd, name=name, overrides=over))
    return out


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
