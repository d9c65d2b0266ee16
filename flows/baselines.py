"""The baselines as Prefect flows: ``sft_flow`` and ``onpolicy_flow``.

Both train on a wall-clock budget in segments, one per held-out checkpoint: segment k trains
until the training clock reaches ``eval_at[k−1]`` and saves θ_k; the shared evaluate task scores
θ_k while the clock is stopped. Each run has its store rows (``runs``, ``prompts``, ``evals``,
``checkpoints``; for sft also the teacher's answers in ``samples``) and its own MLflow run,
nested under ``mlflow_parent`` when one is given (the benchmark's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow

from npd_core.baselines.result import baseline_result, counted_s
from npd_core.baselines.sft import DATA_ROUND, teacher_as_generator
from npd_core.pipeline.kernels import choose_attention
from npd_core.pipeline.spec import RunSpec
from tasks import baselines as b
from tasks import run as run_tasks
from tasks import stages as t

Segment = Callable[[int, float, dict | None, str], dict]  # (k, until_s, previous, mlflow) → result


def _train_and_evaluate(
    spec: RunSpec, eval_at: list[float], mlflow_parent: str | None, segment: Segment,
    before: Callable[[], dict] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Open the run, evaluate θ_0, then segment → evaluate → record per checkpoint; close."""
    mlf = run_tasks.open_run(spec)
    if mlflow_parent:
        b.nest_run(spec.root, mlf, mlflow_parent)
    data = before() if before else None
    evals = [t.evaluate(spec, 0)]
    segments: list[dict] = []
    for k, until in enumerate(eval_at, start=1):
        segments.append(segment(k, until, segments[-1] if segments else data, mlf))
        evals.append(t.evaluate(spec, k, upstream=segments[-1]))
        b.record_checkpoint(spec, k, segments[-1], evals[-1], mlf)
    scores = [e.metrics.score for e in evals]
    run_tasks.close_run(spec, mlf, scores[0], scores[-1])
    return baseline_result(spec.run_id, mlf, segments, scores, sum(e.seconds for e in evals), data)


@flow(name="npd-sft", flow_run_name="{spec.run_id}", log_prints=True)
def sft_flow(
    spec: RunSpec, eval_at: list[float], mlflow_parent: str | None = None
) -> dict[str, Any]:
    """Sequence-level KD: the teacher answers every training prompt once (on the clock), then
    packed CE on its answers until the last checkpoint time. ``spec.config`` should come from
    ``npd_core.baselines.sft.sft_config``. Its learner's packed attention is chosen as NPD's
    is (``choose_attention``), before the clock starts."""
    spec = choose_attention(spec, roles=("train",))

    def teacher_answers() -> dict:
        res = t.generate(teacher_as_generator(spec), DATA_ROUND).to_dict()
        m = res["metrics"]  # the teacher's forwards: each prompt once, then each token it wrote
        return {
            **res,
            "metrics": {**m, "teacher_tokens": m.get("prompt_tokens", 0) + m["generated_tokens"]},
        }

    def segment(k: int, until: float, prev: dict | None, mlf: str) -> dict:
        clock0 = counted_s(prev) if k == 1 else 0.0  # the teacher's answers are on the clock
        return b.sft_train(spec, k, until, eval_at[-1], clock0, upstream=prev, mlflow_run=mlf)

    res = _train_and_evaluate(spec, eval_at, mlflow_parent, segment, before=teacher_answers)
    res["generated_tokens"] = res["data"]["metrics"]["generated_tokens"]
    res["stage_seconds"]["generate"] = counted_s(res["data"])
    return res


@flow(name="npd-onpolicy", flow_run_name="{spec.run_id}", log_prints=True)
def onpolicy_flow(
    spec: RunSpec, eval_at: list[float], prompts_per_step: int, mlflow_parent: str | None = None
) -> dict[str, Any]:
    """Synchronous on-policy distillation (GKD, λ = 1) until the last checkpoint time."""

    def segment(k: int, until: float, prev: dict | None, mlf: str) -> dict:
        return b.onpolicy_train(
            spec, k, until, eval_at[-1], prompts_per_step, upstream=prev, mlflow_run=mlf
        )

    res = _train_and_evaluate(spec, eval_at, mlflow_parent, segment)
    res["prompts_per_step"] = prompts_per_step
    return res
