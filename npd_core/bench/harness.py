"""The rules of ``npd bench`` and the types its variants share (no Prefect: the flows run them).

Fairness rules (fixed here and in the docs before any comparison is looked at):

- every variant starts from the same warm-start student, with the same teacher, training prompts,
  held-out prompts and generation backend (our batched KV-cache sampler);
- every variant gets the same training clock, ``budget_s``; evaluation is off the clock (the
  baselines stop their clock between segments; NPD evaluates after its last round and its clock
  skips the time when evaluation, loading or writing was all that ran and the gaps between
  stages, see :mod:`npd_core.bench.clock`); points past ``budget_s × (1 + SLACK)`` are dropped;
- the held-out score is taken at fixed clock times for the baselines (:func:`checkpoint_times`)
  and at every round boundary for NPD (a round is its natural checkpoint);
- learning rate and batch size come from one grid, searched the same way for each method
  (:mod:`npd_core.bench.search`); ablations use NPD's choice. Batch size means packed rows per
  step for the packed methods and prompts per step for on-policy ones;
- NPD's rounds are sized to the budget from a two-round probe run at the same batch size
  (:mod:`npd_core.bench.sizing`), so its cosine schedule ends where its budget does, as the
  baselines' does.

The seeds' figures are summarized and compared in :mod:`npd_core.bench.stats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from npd_core.bench.curves import FINAL_TAIL

DEFAULT_BUDGET_S = 140.0  # the one setting: training seconds per variant (sizes everything else)
QUICK_FRACTION = 0.25  # --quick: a quarter of the budget, one seed, the three main variants
CHECKPOINTS = 8  # held-out evaluations per baseline run before the final stretch (NPD: a round)…
TAIL_CHECKPOINTS = 4  # …and this many more in the last FINAL_TAIL of the budget (the final score)
SLACK = 0.05  # a checkpoint at most 5% past the budget still counts
NPD_BENCH = {"eval": {"when": "end"}}  # NPD's evaluations after its last round: off its clock
PACKED = ("npd", "sft")  # methods whose batch is packed rows (the others': prompts per step)


@dataclass(frozen=True)
class Hyper:
    """One point of the grid, in each method's units."""

    lr: float
    rows_per_step: int  # packed rows per optimizer step (npd, sft)
    prompts_per_step: int  # sampled prompts per optimizer step (onpolicy, on-policy peers)

    def batch(self, method: str) -> int:
        """The batch size ``method`` runs with, in its own unit."""
        return self.rows_per_step if method in PACKED else self.prompts_per_step


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


def checkpoint_times(budget_s: float) -> list[float]:
    """The baselines' evaluation times: every 1/CHECKPOINTS of the budget up to the final
    stretch (its last ``FINAL_TAIL``), then ``TAIL_CHECKPOINTS`` evenly spaced in it, ending
    at the budget, so the final score averages more than two points."""
    tail_from = (1 - FINAL_TAIL) * budget_s
    early = [budget_s * k / CHECKPOINTS for k in range(1, CHECKPOINTS + 1)]
    step = (budget_s - tail_from) / TAIL_CHECKPOINTS
    late = [tail_from + step * k for k in range(1, TAIL_CHECKPOINTS + 1)]
    return [t for t in early if t <= tail_from] + late
