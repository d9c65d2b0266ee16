"""The bench's training clock on hand-made stage intervals: what it pauses for, what it counts."""

from __future__ import annotations

from npd_core.bench.clock import StageTimes, npd_clock, npd_curve, paused_clock, work_seconds
from npd_core.pipeline.results import EvaluateMetrics, RoundSummary, RunSummary


def test_paused_clock_skips_evaluation_alone_and_the_gaps_between_stages():
    intervals = [
        (100.0, 110.0, False),  # generate
        (105.0, 108.0, True),  # evaluate overlapping generate: not paused
        (110.0, 130.0, False),  # train
        (130.0, 135.0, True),  # evaluate alone: paused
        (135.0, 150.0, False),  # train
        (152.0, 160.0, False),  # train, after a 2 s gap (orchestration): paused
    ]
    clock = paused_clock(intervals)
    assert clock(100.0) == 0.0
    assert clock(130.0) == 30.0
    assert clock(133.0) == 30.0  # frozen while evaluating alone
    assert clock(150.0) == 45.0  # 50 s of real time, 5 s of it paused
    assert clock(151.0) == 45.0 and clock(160.0) == 53.0  # the gap is off the clock


STAGES = [
    ("generate", 1, 0.0, 10.0),
    ("train", 1, 10.0, 20.0),
    ("generate", 2, 12.0, 16.0),  # produced beside training
    ("train", 2, 21.0, 30.0),  # after a 1 s gap
    ("evaluate", 1, 30.0, 33.0),
]
IO = [
    ("generate", 1, 0.0, 2.0),  # loading the generator: alone, off the clock
    ("train", 1, 18.0, 20.0),  # writing θ_1: alone, off the clock
    ("generate", 2, 12.0, 13.0),  # a load while train 1 computes: the clock runs
    ("train", 2, 21.0, 21.5),
]


def test_npd_clock_leaves_out_loads_writes_evaluation_and_gaps():
    times = StageTimes(STAGES, IO)
    clock, end = npd_clock(times)
    assert clock(10.0) == 8.0 and clock(20.0) == 16.0
    assert clock(21.5) == 16.0 and end == clock(30.0) == 24.5
    work = work_seconds(times)
    assert work[("generate", 1)] == 8.0 and work[("train", 1)] == 8.0
    assert work[("generate", 2)] == 3.0 and work[("evaluate", 1)] == 3.0


def _round(r: int, score: float, teacher: int, trained: int, generated: int) -> RoundSummary:
    return RoundSummary(
        round=r, n_generated=8, n_kept=8, train_tokens=trained, mean_loss=None, score=score,
        scores={"held_out": score}, metrics={"held_out": "exact"}, teacher_tokens=teacher,
        generated_tokens=generated, drop_reasons={}, stage_seconds={}, backends={},
        engine_refresh_s=None,
    )  # fmt: skip


def test_npd_curve_stops_at_the_limit_and_counts_until_its_last_round():
    """Round 1's checkpoint comes at 16 s on the clock, round 2's at 24.5 s: with a 20 s limit
    the curve holds θ_0 and round 1; the stages' seconds stop where train 1 ended (train 2
    counts none), evaluation counts for the checkpoints on the curve, and the samples of both
    rounds were made by then."""
    run = RunSummary(
        run_id="r", mlflow_run_id="m", primary_set="held_out", start=EvaluateMetrics(10.0, "exact"),
        rounds=[_round(1, 30.0, 100, 50, 40), _round(2, 45.0, 120, 60, 44)], reused_stages=[],
        registered=None, db="", mlflow_uri="", flow_started=0.0, open_s=0.0, flow_wall_s=33.0,
        stage_intervals=STAGES, io_intervals=IO,
    )  # fmt: skip
    c = npd_curve(run, 20.0, {1: 3, 2: 6})
    assert c.points == [
        {"wall_s": 0.0, "score": 10.0, "teacher_tokens": 0, "steps": 0},
        {"wall_s": 16.0, "score": 30.0, "teacher_tokens": 100, "steps": 3},
    ]
    assert c.stage_seconds == {"generate": 11.0, "train": 8.0, "evaluate": 3.0}
    assert (c.train_tokens, c.generated_tokens) == (50, 84)
    whole = npd_curve(run, 30.0, {1: 3, 2: 6})
    assert whole.points[-1] == {"wall_s": 24.5, "score": 45.0, "teacher_tokens": 220, "steps": 6}
    assert whole.stage_seconds["train"] == 16.5 and whole.train_tokens == 110
