"""External peers as variants of ``npd bench`` (``--peers trl``): ``flows.variants.PEERS`` names
the function here that returns each one's ``Variant``.

``trl`` is TRL's own on-policy distillation (``npd_core.baselines.peers.trl_peer``), run with the
hyperparameters searched for ``onpolicy`` on the same world, checkpoints and budget, as its own
flow run with its own MLflow run under the bench's; a main variant, so it runs ``--seeds`` seeds
as npd, sft and onpolicy do.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from npd_core.bench.harness import Hyper, VariantResult
from npd_core.bench.plan import BenchContext, Variant
from npd_core.config import merge
from npd_core.pipeline.spec import RunSpec
from tasks import tracking
from tasks.baselines import nest_run
from tasks.peers import trl_train


@flow(name="npd-trl", flow_run_name="{spec.run_id}", log_prints=True)
def trl_flow(
    spec: RunSpec,
    prompts_per_step: int,
    budget_s: float,
    eval_at: list[float],
    mlflow_parent: str | None = None,
) -> dict[str, Any]:
    """TRL's DistillationTrainer for ``budget_s`` training seconds, scored at ``eval_at``."""
    mlf = tracking.start_run(spec.root, spec.run_id, spec.cfg.name, spec.config)  # trl-s0, …
    if mlflow_parent:
        nest_run(spec.root, mlf, mlflow_parent)
    res = trl_train(spec, prompts_per_step, budget_s, eval_at, mlf)
    tracking.end_run(spec.root, mlf)
    return {**res, "mlflow_run_id": mlf}


def run_trl_variant(ctx: BenchContext, seed: int, hyper: Hyper) -> VariantResult:
    """The ``trl`` variant: onpolicy's learning rate and prompts per step."""
    spec = ctx.spec("trl", seed, merge(ctx.config, {"train": {"lr": hyper.lr}}))
    res = trl_flow(spec, hyper.prompts_per_step, ctx.budget_s, ctx.eval_at, ctx.mlflow_parent)
    settings = {**res["settings"], "prompts_per_step": hyper.prompts_per_step}
    return VariantResult.from_flow(res, settings)


def trl_variant() -> Variant:
    """``--peers trl``: run with ``onpolicy``'s searched hyperparameters, ``--seeds`` seeds."""
    return Variant("trl", "onpolicy", run_trl_variant, main=True)
