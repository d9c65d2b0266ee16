"""A baseline's curve and totals from its segments: θ_0 at the origin, the teacher's upfront
answers counted from the start, a stage's loads and writes off its counted seconds."""

from __future__ import annotations

from npd_core.baselines.result import baseline_result, counted_s


def _segment(clock: float, step: int, teacher: int) -> dict:
    counters = {"teacher_tokens": teacher, "train_tokens": 50 * step, "train_s": clock / 2}
    return {"metrics": {"clock_s": clock, "step": step, "total_steps": 8, "counters": counters}}


def test_curve_starts_at_theta_0_and_adds_the_upfront_teacher_tokens():
    data = {"metrics": {"teacher_tokens": 100}}
    segments = [_segment(10.0, 4, 0), _segment(20.0, 8, 0)]
    res = baseline_result("r", "m", segments, [1.0, 2.0, 3.0], 4.5, data)
    assert [p["wall_s"] for p in res["curve"]] == [0.0, 10.0, 20.0]
    assert [p["teacher_tokens"] for p in res["curve"]] == [0, 100, 100]
    assert [(p["steps"], p["score"]) for p in res["curve"]] == [(0, 1.0), (4, 2.0), (8, 3.0)]
    assert (res["wall_s"], res["steps"], res["total_steps"], res["train_tokens"]) == (
        20.0,
        8,
        8,
        400,
    )
    assert res["stage_seconds"] == {"train": 10.0, "evaluate": 4.5}


def test_onpolicy_counts_the_teacher_tokens_of_each_segment():
    res = baseline_result("r", "m", [_segment(5.0, 1, 30)], [0.0, 1.0], 1.0, None)
    assert [p["teacher_tokens"] for p in res["curve"]] == [0, 30]
    assert res["data"] is None and res["generated_tokens"] == 0


def test_counted_seconds_leave_out_loads_and_writes():
    assert counted_s({"seconds": 10.0, "io_spans": [(1.0, 2.5), (7.0, 8.0)]}) == 7.5
