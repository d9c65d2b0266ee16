"""The GPU bench at toy sizes on the CPU: every section reports numbers that agree with the
formulas it states, time boxes cut a section and say so, and the CUDA-only torch-varlen
attention computes what per-sequence SDPA does (run here through a reference kernel)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from npd_core.bench import gpu
from npd_core.pipeline.autotune import KERNELS

SECTIONS = ["device", "train", "generate", "score", "onpolicy_step", "projection"]


def qwen2_params(s: dict[str, int]) -> int:
    """Parameters of a Qwen2 model with tied embeddings, from its shapes."""
    h, heads, kv = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"]
    kv_dim = kv * (h // heads)
    layer = (h * h + h) + 2 * (h * kv_dim + kv_dim) + h * h + 3 * h * s["intermediate_size"] + 2 * h
    return s["vocab_size"] * h + s["num_hidden_layers"] * layer + h


def test_the_real_sizes_are_qwen25_05b_and_3b():
    assert qwen2_params(gpu.STUDENT) == 494_032_768  # Qwen2.5-0.5B's published count
    assert round(qwen2_params(gpu.TEACHER) / 1e9, 2) == 3.09  # Qwen2.5-3B


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One ``python -m npd_core.bench.gpu --tiny --json`` run in a subprocess (one thread)."""
    out = tmp_path_factory.mktemp("gpu") / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "npd_core.bench.gpu", "--tiny", "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert json.loads(out.read_text()) == report  # the file holds the final report
    return report


def test_tiny_run_completes_every_section(tiny):
    report = tiny
    for name in SECTIONS:
        sec = report[name]
        assert "error" not in sec, (name, sec.get("error"))
        assert sec["truncated"] is False and 0 <= sec["seconds"] <= sec["time_box_s"]
    dev = report["device"]
    assert dev["student"]["params"] == qwen2_params(gpu.TINY_STUDENT) == 94_784
    assert dev["teacher"]["params"] == qwen2_params(gpu.TINY_TEACHER)
    assert dev["peak_flops"] > 0 and report["wall_s"] > 0


def test_train_mfu_is_the_stated_formula_of_the_reported_numbers(tiny):
    report = tiny
    tr = report["train"]
    assert tr["mfu_formula"] == gpu.MFU_FORMULA
    measured = {n: c for n, c in tr["choices"].items() if "tokens_per_s" in c}
    assert set(measured) == {"sdpa", "sdpa_varlen"}  # CPU: torch varlen, flex, flash are not
    # every CUDA candidate of the pipeline's choice is a choice of the bench, in its order
    cuda = [k.name for k in KERNELS["cuda"]]
    assert list(tr["choices"]) == [*cuda, "sdpa_varlen"]
    for name in ("torch_varlen", "flex_document", "flash_varlen"):
        assert tr["choices"][name]["available"] is False and tr["choices"][name]["why"]
    for c in measured.values():
        assert c["tokens_per_s"] > 0 and len(c["step_s_each"]) == gpu.TINY_PLAN.timed_steps
        assert math.isclose(c["step_s"], sum(c["step_s_each"]) / len(c["step_s_each"]))
        assert math.isclose(c["tokens_per_s"], c["tokens_per_step"] / c["step_s"])
        flops = (
            6 * tr["params"] * c["tokens_per_step"]
            + 6 * tr["layers"] * tr["heads"] * tr["head_dim"] * c["sum_seq_len_sq"]
        )
        assert math.isclose(c["mfu"], flops / c["step_s"] / tr["peak_flops"], rel_tol=1e-9)
        assert 0 < c["mfu"] < 1
        # a row of ~row_tokens real tokens holding several sequences: Σ L² between T²/n and T²
        T, n = c["tokens_per_step"], c["sequences_per_step"]
        assert 0.9 * c["row_tokens"] <= T <= c["row_tokens"] and n > 1
        assert T * T / n <= c["sum_seq_len_sq"] + 1e-6 <= T * T + 1e-6
        assert c["abs_loss_diff_vs_sdpa_varlen"] < 1e-5  # fp32: every choice is exact
    assert tr["best_tokens_per_s"] == max(c["tokens_per_s"] for c in measured.values())


def test_generate_score_and_onpolicy_figures_agree_with_their_definitions(tiny):
    report = tiny
    g = report["generate"]
    for B in gpu.TINY_PLAN.gen_batches:
        row = g["batches"][str(B)]
        assert math.isclose(row["tokens_per_s"], B * g["new_tokens"] / row["seconds"])
    ratio = g["batches"]["1024"]["tokens_per_s"] / g["batches"]["8"]["tokens_per_s"]
    assert math.isclose(g["ratio_batch1024_over_batch8"], ratio)
    s = report["score"]
    assert s["tokens"] > s["response_tokens"] > 0 and s["tokens_per_s"] > 0
    assert s["response_tokens"] == gpu.TINY_PLAN.score_samples * gpu.TINY_PLAN.new_tokens
    assert math.isclose(s["tokens_per_s"], s["tokens"] / s["score_s"])
    op = report["onpolicy_step"]
    parts = [op["generate_s"], op["teacher_score_s"], op["student_update_s"]]
    assert min(parts) > 0 and math.isclose(op["total_s"], sum(parts))
    assert abs(sum(op["fractions"].values()) - 1) < 1e-6
    assert math.isclose(op["fractions"]["generate"], op["generate_s"] / op["total_s"])
    assert op["generated_tokens"] == gpu.TINY_PLAN.onpolicy_prompts * gpu.TINY_PLAN.new_tokens
    pr = report["projection"]
    # the cost model's projection, with the sample efficiency of the bench JSON in docs/
    assert Path(pr["bench"]).name in ("bench-long.json", "bench-toy.json")
    assert sorted(map(int, pr["units"]["decode"])) == sorted(gpu.TINY_PLAN.gen_batches)
    assert pr["available"] == (pr["speedup"] is not None)
    if pr["speedup"] is not None:
        assert math.isclose(pr["speedup"], pr["onpolicy"]["clock_s"] / pr["npd"]["clock_s"])
    ps = pr["per_sample"]
    rates = ps["rates"]
    assert ps["decode_batch"] == gpu.TINY_PLAN.onpolicy_prompts
    assert rates["decode_tokens_per_s"] == g["batches"]["32"]["tokens_per_s"]
    p, r = ps["sample"]["prompt_tokens"], ps["sample"]["response_tokens"]
    assert math.isclose(ps["student_decode_s"], r / rates["decode_tokens_per_s"])
    assert math.isclose(ps["teacher_score_s"], (p + r) / s["tokens_per_s"])
    assert math.isclose(ps["train_s"], (p + r) / report["train"]["best_tokens_per_s"])
    assert abs(sum(ps["fractions"].values()) - 1) < 1e-6


def test_a_section_past_its_box_reports_what_it_measured_and_says_truncated(tmp_path):
    out = tmp_path / "bench.json"
    report = gpu.run_bench(tiny=True, out=out, boxes={"train": 0, "generate": 0})
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    tr, g = report["train"], report["generate"]
    assert tr["truncated"] is True and g["truncated"] is True
    # the first unit runs (on CPU: sdpa, the first available), the rest are skipped and marked
    assert tr["choices"]["sdpa"]["tokens_per_s"] > 0
    assert tr["choices"]["sdpa_varlen"]["skipped"] == "time box"
    assert tr["best"] == "sdpa"
    assert g["batches"]["8"]["tokens_per_s"] > 0
    assert all(g["batches"][str(B)]["skipped"] == "time box" for B in (32, 128, 512, 1024))
    assert "ratio_batch1024_over_batch8" not in g
    for name in ("device", "score", "onpolicy_step", "projection"):
        assert report[name]["truncated"] is False
    # the projection says what it lacks rather than inventing a rate
    assert report["projection"]["per_sample"] is None
    assert "generate batch 32" in report["projection"]["per_sample_why"]


def test_a_section_that_hangs_is_cut_and_the_run_goes_on(tmp_path, monkeypatch):
    """The hard limit interrupts a section that would wait for ever (it never records that its
    wait ended), keeps what it measured before, and the sections after it still run."""

    def hangs(b, box, res):
        res["measured_before_the_hang"] = 1.0
        res["wait_ended"] = threading.Event().wait()  # nothing sets it: only the cut ends it

    monkeypatch.setattr(gpu, "HARD_GRACE_S", 0.3)
    monkeypatch.setitem(gpu.SECTION_FNS, "score", hangs)
    out = tmp_path / "bench.json"
    report = gpu.run_bench(tiny=True, out=out, boxes={"score": 0})
    sc = report["score"]
    assert sc["truncated"] is True and "hard limit" in sc["cut"]
    assert sc["measured_before_the_hang"] == 1.0 and "wait_ended" not in sc
    assert report["onpolicy_step"]["truncated"] is False  # the sections after it still ran
    assert json.loads(out.read_text())["score"]["truncated"] is True
