"""What a baseline run returns to the bench: its held-out curve on the training clock and its
totals, assembled from the segments' results (plain dicts, as the Prefect tasks persist them)."""

from __future__ import annotations

from typing import Any


def counted_s(stage: dict[str, Any]) -> float:
    """A stage's seconds less its loads and writes (``io_spans``), as the clocks count them."""
    return stage["seconds"] - sum(e - s for s, e in stage["io_spans"])


def baseline_result(
    run_id: str,
    mlflow_run_id: str,
    segments: list[dict[str, Any]],
    scores: list[float],
    eval_seconds: float,
    data: dict[str, Any] | None,
) -> dict[str, Any]:
    """The run's curve (θ_0 and one point per segment: clock, score, teacher tokens, steps) and
    totals. ``scores`` has one more entry than ``segments`` (θ_0's); ``data`` is the stage run
    before the first segment (sft: the teacher's answers, whose teacher tokens count from
    the start), else None."""
    last = segments[-1]["metrics"]
    counters = last["counters"]
    stage_s = {k.removesuffix("_s"): v for k, v in counters.items() if k.endswith("_s")}
    stage_s["evaluate"] = eval_seconds
    clocks = [0.0] + [x["metrics"]["clock_s"] for x in segments]
    upfront = data["metrics"]["teacher_tokens"] if data else 0
    teacher = [0] + [upfront + x["metrics"]["counters"].get("teacher_tokens", 0) for x in segments]
    steps = [0] + [x["metrics"]["step"] for x in segments]
    return {
        "run_id": run_id,
        "mlflow_run_id": mlflow_run_id,
        "curve": [
            {"wall_s": w, "score": s, "teacher_tokens": int(n), "steps": int(k)}
            for w, s, n, k in zip(clocks, scores, teacher, steps, strict=True)
        ],
        "wall_s": last["clock_s"],
        "steps": last["step"],
        "total_steps": last["total_steps"],
        "train_tokens": int(counters.get("train_tokens", 0)),
        "generated_tokens": int(counters.get("generated_tokens", 0)),
        "stage_seconds": stage_s,
        "data": data,
    }
