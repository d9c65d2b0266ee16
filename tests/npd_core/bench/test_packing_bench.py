"""The packing benchmark's workload (synthetic lengths, the length-grouped baseline sampler) and
a tiny run of the benchmark itself on CPU, with the kernel selection and the learner timed per
kernel."""

from __future__ import annotations

import math
import statistics

import pytest

from npd_core.bench import packing as bench_packing
from npd_core.bench import workload
from npd_core.method.attention import SDPA, VARLEN


def test_length_grouped_batches_match_the_trainer_sampler():
    lens = [p + r for p, r in workload.synthetic_lengths(1000, 60, 400, seed=0)]
    batches = workload.length_grouped_batches(lens, 10, seed=0)  # mega-batch 25 × 10
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) == 10 for b in batches)
    assert max(lens[i] for i in batches[0]) == max(lens)  # longest first (OOM early)
    for m in range(0, 100, 25):  # sorted longest-first inside each mega-batch
        flat = [lens[i] for b in batches[m + 1 : m + 25] for i in b]
        assert flat == sorted(flat, reverse=True)


def test_synthetic_lengths_have_the_asked_median_and_p99():
    pairs = workload.synthetic_lengths(20000, 60, 400, seed=0)
    tot = sorted(p + r for p, r in pairs)
    assert min(min(p, r) for p, r in pairs) >= 1
    assert abs(statistics.median(tot) - 60) <= 4
    assert abs(tot[int(0.99 * len(tot))] - 400) <= 40


def test_bench_runs_and_reports_the_figures():
    res = bench_packing.run_bench(
        n_samples=40, median_len=8, p99_len=30, rows_per_step=2, calib_steps=2, device="cpu", seed=0
    )
    assert res["n_samples"] == res["n_kept"] == 40  # truncate: every sample fits a row
    assert res["attention"] in ("sdpa", "eager", VARLEN) and res["device"].startswith("cpu")
    assert res["max_seq_len"] == 16 * math.ceil(2 * res["p99_len"] / 16)
    assert 0 < res["padded_fill_ratio"] <= 1 and 0 < res["fill_ratio"] <= 1
    assert res["fill_bound_speedup"] == pytest.approx(res["fill_ratio"] / res["padded_fill_ratio"])
    # both layouts trained on the same tokens; the rates and the speedup are of the same seconds
    assert 0 < res["response_tokens"] < res["real_tokens"]
    assert res["speedup"] == pytest.approx(res["padded_seconds"] / res["packed_seconds"])
    for layout in ("packed", "padded"):
        seconds = res[f"{layout}_seconds"]
        assert res[f"{layout}_tokens_per_s"] == pytest.approx(res["response_tokens"] / seconds)
        assert math.isfinite(res[f"{layout}_mean_loss"]) and res[f"{layout}_mean_loss"] > 0
    assert max(res["exact_check_abs_loss_diff"].values()) <= 1e-4
    # the pipeline's choice for these rows, and the real learner (train_round) with each kernel
    sel, learner = res["selection"], res["learner"]
    assert sel["kernel"] in (SDPA, VARLEN) and set(sel["probe_s"]) == {SDPA, VARLEN}
    assert set(learner["kernels"]) == {SDPA, VARLEN} and learner["fastest"] in (SDPA, VARLEN)
    assert all(k["steps"] == 8 and k["s_per_step"] > 0 for k in learner["kernels"].values())
    assert learner["max_abs_first_loss_diff"] <= 1e-5  # same student, same rows, exact kernels
