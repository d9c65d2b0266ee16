"""What a variant of ``npd bench`` is: a name plus a runner ``(ctx, seed, hyper) -> VariantResult``.

The built-in variants (``flows.headline``) and the external peers (``flows.peers``) both build
on these types, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npd_core.config import NPDConfig
from npd_core.pipeline.spec import RunSpec


@dataclass(frozen=True)
class Hyper:
    """One point of the grid, in each method's units."""

    lr: float
    rows_per_step: int  # packed rows per optimizer step (npd, sft)
    prompts_per_step: int  # sampled prompts per optimizer step (onpolicy, on-policy peers)


@dataclass
class VariantResult:
    """What a runner returns for one seed: the held-out curve on its training clock (evaluation
    excluded), its token counts, seconds per stage and the settings it ran with."""

    curve: list[dict[str, float]]  # [{"wall_s": …, "score": …}], first point θ_0 at 0 s
    wall_s: float  # training clock at the end
    train_tokens: int  # tokens through training forwards (padding excluded)
    generated_tokens: int  # tokens sampled
    stage_seconds: dict[str, float]  # by stage; "evaluate" is reported but off the clock
    settings: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # npd run id in the store (``npd status``)
    mlflow_run_id: str | None = None

    @classmethod
    def from_flow(
        cls, res: dict[str, Any], settings: dict[str, Any], run_id: str | None = None
    ) -> VariantResult:
        """From a baseline or peer flow's result dict (the keys those flows all return)."""
        keys = ("curve", "wall_s", "train_tokens", "generated_tokens", "stage_seconds")
        return cls(
            **{k: res[k] for k in keys},
            settings=settings,
            run_id=run_id,
            mlflow_run_id=res["mlflow_run_id"],
        )


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
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)  # probe by batch
    results: dict[str, list[VariantResult]] = field(default_factory=dict)  # done so far
    tag: str = ""  # run-id infix: "" for the main runs, "search-…" for the grid search

    def spec(self, name: str, seed: int, config: dict[str, Any]) -> RunSpec:
        """A RunSpec of this bench's world for ``config`` (validated), with its own run id."""
        label = f"{self.tag}{name}-s{seed}"
        cfg = NPDConfig.model_validate({**config, "seed": seed, "name": label})
        run_id = f"{self.bench_id}-{label}"
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
