"""NPD's rounds sized to the budget from hand-made probe figures."""

from __future__ import annotations

import pytest
from bench_config import TINY_BENCH

from npd_core.bench.sizing import choose_threads, npd_rounds, predicted_clock, thread_options
from npd_core.config import NPDConfig

CFG = TINY_BENCH
ONE_ROUND = {
    "train_s_per_row": 1e3,
    "produce_s_per_sample": 1e3,
    "rows_per_sample": 0.2,
    "overlap_gain": 1.0,
}


@pytest.mark.parametrize(
    ("staleness", "learn_s", "gain", "budget_s", "rounds"),
    [
        (1, 4.0, 2.0, 35.0, 5),  # P + 4·max(P, L) + L = 6 + 24 + 4 = 34 ≤ 35; a 6th ends at 40
        (1, 4.0, 2.0, 33.9, 4),  # 34 > 33.9: one round fewer, never past the budget
        (1, 2.0, 2.0, 33.0, 5),  # a short last learner leaves room: 6 + 24 + 2 = 32
        (1, 6.0, 2.0, 34.5, 4),  # 6 + 18 + 6 = 30; a 5th would end at 36, past the budget
        (1, 4.0, 1.25, 35.0, 4),  # sharing cores: a middle round takes (6 + 4) / 1.25 = 8 s
        (1, 4.0, 1.25, 33.9, 3),  # 6 + 3·8 + 4 = 34 > 33.9
        (2, 4.0, 2.0, 35.0, 5),  # any staleness ≥ 1 overlaps the same way
        (0, 4.0, 2.0, 35.0, 3),  # in order, no gain: 3·(6 + 4) = 30; a 4th would end at 40
        (1, 4.0, 2.0, 5.0, 1),  # at least one round
    ],
)
def test_npd_rounds_fill_the_budget_without_passing_it(staleness, learn_s, gain, budget_s, rounds):
    """Probe: producing a round (1000 samples) takes P = 6 s, learning it (100 steps of 10 rows)
    L = ``learn_s``; overlapped, the two ran ``gain`` × faster than in order. The first producer
    and the last learner run alone."""
    cfg = NPDConfig.model_validate(
        {
            "staleness": staleness,
            "data": {"prompts_per_round": 1000},
            "generate": {"n_per_prompt": 1},
            "train": {"steps_per_round": 100, "rows_per_step": 10, "epochs_per_round": 10},
        }
    )
    cal = {
        "train_s_per_row": learn_s / 1000,
        "produce_s_per_sample": 0.006,
        "rows_per_sample": 0.5,
        "overlap_gain": gain,
    }
    assert npd_rounds(cfg, cal, budget_s) == rounds


def test_threads_are_the_probed_count_that_fits_the_most_rounds():
    cfg = NPDConfig.model_validate({**CFG, "threads": 0})
    slow = {**ONE_ROUND, "train_s_per_row": 1.0, "produce_s_per_sample": 0.5}
    fast = {**slow, "train_s_per_row": 0.5}  # learning twice as fast: more rounds fit
    assert npd_rounds(cfg, fast, 1000.0) > npd_rounds(cfg, slow, 1000.0)
    assert choose_threads(cfg, {"1": slow, "2": fast}, 1000.0) == (2, fast)
    assert choose_threads(cfg, {"1": fast, "2": slow}, 1000.0) == (1, fast)
    # the same rounds either way: the shorter predicted clock, then fewer threads
    near = {**slow, "train_s_per_row": 0.999}
    r = npd_rounds(cfg, slow, 1000.0)
    assert npd_rounds(cfg, near, 1000.0) == r
    assert predicted_clock(cfg, near, r) < predicted_clock(cfg, slow, r)
    assert choose_threads(cfg, {"1": slow, "2": near}, 1000.0)[0] == 2
    assert choose_threads(cfg, {"1": slow, "2": dict(slow)}, 1000.0)[0] == 1
    assert thread_options(NPDConfig.model_validate({"threads": 3})) == [3]
