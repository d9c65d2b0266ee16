"""The cost model's arithmetic on hand-made curves and unit costs: counts read off a curve, each
variant's seconds per stage, NPD's pipelined clock, and the validation against later seeds."""

from __future__ import annotations

import json

import pytest

from npd_core.bench import cost

UNITS = {
    "workload": {},
    "1": {
        "decode": {"8": 100.0, "32": 400.0, "128": 1000.0, "512": 2000.0, "1024": 2000.0},
        "score_packed_tokens_per_s": 5000.0,
        "train_packed": {"4": {"c0_s": 0.1, "tokens_per_s": 2000.0}},
    },
    "2": {
        "decode": {"8": 150.0, "32": 600.0, "128": 1500.0, "512": 3000.0, "1024": 3000.0},
        "teacher_decode_tokens_per_s": 500.0,
        "score_padded_tokens_per_s": 4000.0,
        "train_packed": {"4": {"c0_s": 0.05, "tokens_per_s": 4000.0}},
        "train_padded": {"c0_s": 0.05, "tokens_per_s": 3000.0},
    },
}
WORK = {
    "gen_batch": 128,
    "n_per_prompt": 1,
    "onpolicy_prompts": 32,
    "npd_rows": 4,
    "sft_rows": 4,
    "threads": {"npd": 1, "baselines": 2},
    "overlap_gain": 1.5,
}


def test_at_score_interpolates_like_time_to_reach():
    curve = [
        {"score": 10.0, "teacher_tokens": 0, "steps": 0},
        {"score": 30.0, "teacher_tokens": 1000, "steps": 10},
        {"score": 50.0, "teacher_tokens": 3000, "steps": 30},
    ]
    assert cost.at_score(curve, 40.0, "teacher_tokens") == 2000.0
    assert cost.at_score(curve, 40.0, "steps") == 20.0
    assert cost.at_score(curve, 5.0, "steps") == 0.0
    assert cost.at_score(curve, 60.0, "steps") is None


def test_pipeline_clock_in_order_and_overlapped():
    assert cost.pipeline_clock(2.0, 3.0, 4, None) == 20.0
    # overlapped: P + (R − 1)·max(P, L, (P + L)/g) + L
    assert cost.pipeline_clock(2.0, 3.0, 4, 2.0) == 2.0 + 3 * 3.0 + 3.0
    assert cost.pipeline_clock(2.0, 3.0, 4, 1.25) == 2.0 + 3 * 4.0 + 3.0
    assert cost.pipeline_clock(2.0, 3.0, 1, 2.0) == 5.0


def test_decode_rate_is_linear_in_log_batch():
    rates = UNITS["1"]["decode"]
    assert cost.decode_rate(rates, 32) == 400.0
    assert cost.decode_rate(rates, 64) == pytest.approx(700.0)  # halfway in log between 32, 128
    assert cost.decode_rate(rates, 4) == 100.0 and cost.decode_rate(rates, 4096) == 2000.0


def test_each_variant_pays_count_times_unit_cost():
    counts = {
        "teacher_tokens": 10_000.0,
        "generated_tokens": 4_000.0,
        "steps": 20.0,
        "train_tokens": 8_000.0,
        "rounds": 4.0,
    }
    on = cost.predict("onpolicy", counts, UNITS, WORK)["stage_seconds"]
    assert on == pytest.approx(
        {
            "generate": 4000 / 600,  # batch 32 at 2 threads
            "score": 10_000 / 4000,
            "train": 20 * (0.05 + 400 / 3000),
        }
    )
    sft = cost.predict("sft", counts, UNITS, WORK)
    assert sft["stage_seconds"] == pytest.approx(
        {"generate": 4000 / 500, "train": 20 * (0.05 + 400 / 4000)}
    )
    assert sft["clock_s"] == pytest.approx(sum(sft["stage_seconds"].values()))
    npd = cost.predict("npd", counts, UNITS, WORK)
    st = npd["stage_seconds"]
    assert st == pytest.approx(
        {"generate": 4000 / 1000, "score": 10_000 / 5000, "train": 20 * (0.1 + 400 / 2000)}
    )
    p, learn = (st["generate"] + st["score"]) / 4, st["train"] / 4
    assert npd["clock_s"] == pytest.approx(cost.pipeline_clock(p, learn, 4, 1.5))
    with pytest.raises(ValueError, match="no cost model"):
        cost.predict("trl", counts, UNITS, WORK)


def _run(name: str, rate: float, seed: int) -> tuple[list[dict], dict]:
    """A run whose counts grow linearly with its clock and whose score rises by ``rate`` points
    per 1000 teacher tokens; its stage seconds are what the model predicts for its counts."""
    curve = [{"wall_s": 0.0, "score": 10.0, "teacher_tokens": 0, "steps": 0}]
    for r in range(1, 9):
        x = 2000.0 * r
        counts = {
            "teacher_tokens": x,
            "generated_tokens": x / 2 if name != "sft" else 3000.0,
            "steps": 5.0 * r,
            "train_tokens": 5.0 * r * 400,
            "rounds": float(r),
        }
        p = cost.predict(name, counts, UNITS, WORK)
        curve.append(
            {"wall_s": p["clock_s"], "score": 10.0 + rate * x / 1000, "teacher_tokens": x,
             "steps": 5 * r}
        )  # fmt: skip
    totals = {
        "stage_seconds": p["stage_seconds"],
        "train_tokens": counts["train_tokens"],
        "generated_tokens": counts["generated_tokens"],
    }
    return curve, totals


def _variants(rates: tuple[tuple[str, float], ...]) -> dict[str, dict]:
    """A bench's ``variants`` table: 3 seeds of ``_run`` per (name, rate)."""
    variants = {}
    for name, rate in rates:
        runs = [_run(name, rate, s) for s in range(3)]
        curves = [c for c, _ in runs]
        variants[name] = {
            "seed_curves": curves,
            "seed_totals": [t for _, t in runs],
            "final_scores": [c[-1]["score"] for c in curves],
        }
    return variants


def test_model_bench_recovers_the_speedup_of_runs_that_follow_it():
    """Runs made of the model's own seconds: the prediction from seed 0 equals what seeds 1–2
    measured, stage by stage and in speedup."""
    variants = _variants((("npd", 4.0), ("sft", 2.0), ("onpolicy", 3.0)))
    res = cost.model_bench({"variants": variants}, UNITS, WORK)
    s = res["speedup"]
    assert s["measured_seeds_1_2"] is not None and s["predicted"] == pytest.approx(
        s["measured_seeds_1_2"], rel=1e-6
    )
    assert s["within_tolerance"] is True and abs(s["relative_error"]) < 1e-6
    for name in ("npd", "sft", "onpolicy"):
        assert [r["seed"] for r in res[name]["runs"]] == [1, 2]
        for r in res[name]["runs"]:
            assert r["predicted"]["clock_s"] == pytest.approx(r["measured"]["clock_s"])
            for stage, v in r["measured"]["stage_seconds"].items():
                assert r["predicted"]["stage_seconds"][stage] == pytest.approx(v)
    assert res["sft"]["to_target"] is None  # sft tops out at 42 < the target, 46
    assert res["target_score"] == pytest.approx(10 + 0.75 * 48)
    # npd's learner (20 steps at 0.3 s) outweighs its producer; onpolicy's decoding at batch 32
    assert res["bottleneck"] == {"npd": "train", "onpolicy": "generate"}


def test_project_uses_another_devices_rates_with_the_benchs_sample_efficiency():
    """The GPU bench's projection: seed 0's counts to the target, one set of device rates."""
    variants = {}
    for name, rate in (("npd", 4.0), ("onpolicy", 3.0)):
        curve, totals = _run(name, rate, 0)
        variants[name] = {
            "seed_curves": [curve],
            "seed_totals": [totals],
            "final_scores": [curve[-1]["score"]],
        }
    bench = {"variants": variants}
    device = {
        **UNITS["2"],
        "score_packed_tokens_per_s": 9000.0,
        "train_packed": {"4": {"c0_s": 0.0, "tokens_per_s": 8000.0}},
    }
    work = {**WORK, "threads": {"npd": "device", "baselines": "device"}, "overlap_gain": None}
    res = cost.project(bench, device, overlap_gain=None, work=work)
    target = 10 + 0.75 * 48  # onpolicy's seed 0 goes from 10 to 58
    assert res["target_score"] == pytest.approx(target)
    # npd reaches 46 at 9000 teacher tokens, onpolicy at 12000 (4 and 3 points per 1000)
    assert res["npd"]["counts"]["teacher_tokens"] == pytest.approx(9000)
    assert res["onpolicy"]["counts"]["teacher_tokens"] == pytest.approx(12000)
    expect = {n: cost.predict(n, res[n]["counts"], {"device": device}, work) for n in res
              if n in ("npd", "onpolicy")}  # fmt: skip
    assert res["npd"]["clock_s"] == pytest.approx(expect["npd"]["clock_s"])
    assert res["speedup"] == pytest.approx(expect["onpolicy"]["clock_s"] / expect["npd"]["clock_s"])


def test_no_target_when_onpolicy_gains_nothing():
    """onpolicy ends at or below its start (the long world's bench): the target sits below the
    start, so no variant gets a cost to it, no bottleneck and no speedup; the per-run
    predictions beside the measured seconds still come out."""
    variants = _variants((("npd", -1.0), ("sft", 2.0), ("onpolicy", -0.5)))
    res = cost.model_bench({"variants": variants}, UNITS, WORK)
    assert res["target_score"] < 10.0  # below every start
    assert all(res[n]["to_target"] is None for n in ("npd", "sft", "onpolicy"))
    assert res["bottleneck"] == {}
    assert res["speedup"]["predicted"] is None and res["speedup"]["within_tolerance"] is None
    assert [r["seed"] for r in res["onpolicy"]["runs"]] == [1, 2]
    proj = cost.project({"variants": variants}, UNITS["2"], work=WORK)
    assert proj["npd"] is None and proj["onpolicy"] is None and proj["speedup"] is None


def test_localize_points_the_copy_at_this_output_directory(tmp_path):
    """A bench whose world exists here keeps its paths; its copy names ``out`` as its output."""
    paths = {k: str(tmp_path / k) for k in ("teacher", "student", "train_prompts", "eval_prompts")}
    for p in paths.values():
        open(p, "w").close()
    bench = tmp_path / "bench-toy.json"
    bench.write_text(json.dumps({"paths": paths, "out": "/elsewhere", "budget_s": 140.0}))
    local = cost.localize(bench, "toy", tmp_path / "out", lambda m: None)
    assert local == tmp_path / "out" / ".cost-bench-toy.json"
    copy = json.loads(local.read_text())
    assert copy == {"paths": paths, "out": str((tmp_path / "out").resolve()), "budget_s": 140.0}


def _bench(variants: dict[str, dict]) -> dict:
    """A bench JSON around ``variants`` whose workload is ``WORK`` (npd on 1 thread with the
    probe's overlap gain 1.5, the baselines on 2)."""
    rows = {"lr": 1e-3, "rows_per_step": 4, "prompts_per_step": 32}
    variants["npd"]["settings"] = [{"threads": 1}]
    return {
        "variants": variants,
        "config": {
            "staleness": 1, "threads": 2, "generate": {"batch_size": 128, "n_per_prompt": 1},
            "pack": {"max_seq_len": 256}, "score": {"top_k": 16, "batch_tokens": 4096},
        },
        "grid": {
            "base_lengths": {"prompt_tokens": 9.0, "response_tokens": 40.0},
            "chosen": {"npd": rows, "sft": rows, "onpolicy": rows},
        },
        "calibration": {"4": {"1": {"overlap_gain": 1.5}}},
        "train_prompts": 100,
    }  # fmt: skip


def test_calibrate_reads_each_stages_rate_off_the_seed_0_runs():
    """Runs made of the model's seconds: each unit is tokens ÷ the stage's seconds at the run's
    batch, the per-step fixed cost folded into the rate at that batch."""
    bench = _bench(_variants((("npd", 4.0), ("sft", 2.0), ("onpolicy", 3.0))))
    work = cost.workload(bench)
    assert {k: work[k] for k in WORK} == WORK
    units = cost.calibrate(bench, work)
    assert units["1"]["decode"] == {"128": pytest.approx(1000.0)}  # UNITS["1"] at batch 128
    assert units["1"]["score_packed_tokens_per_s"] == pytest.approx(5000.0)
    # 400 tokens a step at 0.1 + 400/2000 = 0.3 s a step: 1333 tokens/s, no c0
    assert units["1"]["train_packed"]["4"] == {"c0_s": 0.0, "tokens_per_s": pytest.approx(4000 / 3)}
    assert units["2"]["decode"] == {"32": pytest.approx(600.0)}
    assert units["2"]["teacher_decode_tokens_per_s"] == pytest.approx(500.0)
    assert units["2"]["score_padded_tokens_per_s"] == pytest.approx(4000.0)
    assert units["2"]["train_padded"]["tokens_per_s"] == pytest.approx(400 / (0.05 + 400 / 3000))


def test_in_run_predicts_the_speedup_seeds_1_2_measure(tmp_path):
    """The bench's own cost model: predicted_speedup_75 from seed 0 equals what seeds 1-2
    measured on runs that follow the model; the GPU projection uses the GPU bench's rates."""
    bench = _bench(_variants((("npd", 4.0), ("sft", 2.0), ("onpolicy", 3.0))))
    gpu = {
        "device": {"name": "H100", "student": {"like": "Qwen2.5-0.5B"},
                   "teacher": {"like": "Qwen2.5-3B"}},
        "generate": {"prompt_len": 64, "new_tokens": 128,
                     "batches": {"8": {"tokens_per_s": 80.0}, "128": {"tokens_per_s": 1300.0}}},
        "score": {"tokens_per_s": 56_000.0},
        "train": {"best_tokens_per_s": 61_000.0},
        "onpolicy_step": {"train_tokens": 12_000, "teacher_score_s": 0.25, "student_update_s": 1.0},
    }  # fmt: skip
    path = tmp_path / "gpu-bench.json"
    path.write_text(json.dumps(gpu))
    res = cost.in_run(bench, path)
    pm = res["predicted_vs_measured_75"]
    assert res["predicted_speedup_75"] == pytest.approx(pm["measured_seeds_1_2"], rel=1e-6)
    assert pm["within_tolerance"] is True and res["cost_model"]["bottleneck"]["npd"] == "train"
    g = res["gpu_projection"]
    units = cost.device_units(gpu, {4})
    assert g["units"] == units and g["device"] == "H100" and len(g["assumptions"]) == 5
    assert g["speedup"] == pytest.approx(cost.project(bench, units)["speedup"])
    assert units["score_padded_tokens_per_s"] == 48_000.0  # 12,000 tokens in 0.25 s
    lines = cost.cost_lines(res)
    assert lines[0].startswith("predicted_speedup_75: ") and lines[0].endswith(", +0%)")
    assert "projection to H100 (not measured)" in lines[1]
    assert cost.in_run(bench, tmp_path / "none.json")["gpu_projection"] is None


def test_in_run_without_onpolicy_or_with_one_seed():
    one = _bench(_variants((("npd", 4.0), ("onpolicy", 3.0))))
    for v in one["variants"].values():
        v["seed_curves"], v["seed_totals"] = v["seed_curves"][:1], v["seed_totals"][:1]
    res = cost.in_run(one)
    assert res["predicted_speedup_75"] is not None  # predicted from seed 0 …
    assert res["predicted_vs_measured_75"]["measured_seeds_1_2"] is None  # … validated later
    del one["variants"]["onpolicy"]
    res = cost.in_run(one)
    assert res["predicted_speedup_75"] is None and res["cost_model"]["available"] is False
