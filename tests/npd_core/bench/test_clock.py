"""The bench's training clock on hand-made stage intervals: what it pauses for, what it counts."""

from __future__ import annotations

from npd_core.bench.clock import StageTimes, npd_clock, paused_clock, work_seconds


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


def test_npd_clock_leaves_out_loads_writes_evaluation_and_gaps():
    res = {
        "stage_intervals": [
            ("generate", 1, 0.0, 10.0),
            ("train", 1, 10.0, 20.0),
            ("generate", 2, 12.0, 16.0),  # produced beside training
            ("train", 2, 21.0, 30.0),  # after a 1 s gap
            ("evaluate", 1, 30.0, 33.0),
        ],
        "io_intervals": [
            ("generate", 1, 0.0, 2.0),  # loading the generator: alone, off the clock
            ("train", 1, 18.0, 20.0),  # writing θ_1: alone, off the clock
            ("generate", 2, 12.0, 13.0),  # a load while train 1 computes: the clock runs
            ("train", 2, 21.0, 21.5),
        ],
    }
    times = StageTimes(res["stage_intervals"], res["io_intervals"])
    clock, end = npd_clock(times)
    assert clock(10.0) == 8.0 and clock(20.0) == 16.0
    assert clock(21.5) == 16.0 and end == clock(30.0) == 24.5
    work = work_seconds(times)
    assert work[("generate", 1)] == 8.0 and work[("train", 1)] == 8.0
    assert work[("generate", 2)] == 3.0 and work[("evaluate", 1)] == 3.0
