"""The GPU bench at toy sizes on the CPU, through ``scripts/device-check --tiny`` (the check's
CPU path: it also runs the CUDA tests, which skip here, and writes the JSON a GPU run writes):
every section reports numbers that agree with the formulas it states, time boxes cut a section
and say so, the CUDA-only torch-varlen attention computes what per-sequence SDPA does (through a
reference kernel), and what the check runs needs nothing a box with only torch and transformers
lacks beyond the wheels it carries."""

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

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "device-check"
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


def skip_without_cuda() -> list[str]:
    """The test files that skip where CUDA is missing (they ask torch, then skip)."""
    found = []
    for f in sorted((ROOT / "tests").rglob("test_*.py")):
        text = f.read_text() if f != Path(__file__).resolve() else ""
        if "cuda.is_available()" in text and ("pytest.skip(" in text or "skipif(" in text):
            found.append(str(f.relative_to(ROOT)))
    return found


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> tuple[Path, dict]:
    """One ``scripts/device-check --tiny`` run: the CUDA tests (which skip here) beside
    ``python -m npd_core.bench.gpu --tiny``, one thread each; its folder and summary."""
    out = tmp_path_factory.mktemp("device-check")
    env = {**os.environ, "OUT": str(out)}
    cmd = [sys.executable, str(SCRIPT), "--tiny"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "device-check.json").read_text())
    assert json.loads(r.stdout) == summary  # stdout: the same summary
    return out, summary


@pytest.fixture(scope="module")
def tiny(check) -> dict:
    """The GPU bench's report from that run (``gpu-bench.json``: the final report)."""
    out, summary = check
    return json.loads((out / summary["bench"]["file"]).read_text())


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


def test_the_tiny_check_runs_every_test_that_needs_cuda(check):
    _, summary = check
    assert summary["ok"] and summary["tiny"] and 0 < summary["wall_s"] <= summary["budget_s"]
    tests = summary["tests"]
    assert tests["files"] == skip_without_cuda()
    assert (tests["rc"], tests["failed"], tests["errors"], tests["failures"]) == (0, 0, 0, [])
    assert tests["passed"] >= 1 and not tests["timed_out"]
    cases = 2 * len(KERNELS["cuda"])  # each CUDA kernel in bf16 and fp32: skipped here
    assert tests["skipped"] == cases == sum(tests["skip_reasons"].values())


def test_the_tiny_check_reports_the_benchs_figures(check):
    out, summary = check
    bench = summary["bench"]
    report = json.loads((out / bench["file"]).read_text())
    assert (bench["rc"], bench["timed_out"], report["tiny"]) == (0, False, True)
    assert list(bench["sections"]) == list(SECTIONS)
    assert not any(s["truncated"] or "error" in s for s in bench["sections"].values())
    assert bench["train_tokens_per_s"] == report["train"]["best_tokens_per_s"] > 0
    assert 0 < bench["train_mfu"] < 1 and bench["train_best"] in report["train"]["choices"]
    decode = bench["decode_tokens_per_s"]
    assert list(decode) == ["8", "32", "128", "512", "1024"] and min(decode.values()) > 0
    assert bench["score_tokens_per_s"] == report["score"]["tokens_per_s"] > 0
    assert bench["onpolicy_step_s"] > 0
    assert sum(bench["onpolicy_fractions"].values()) == pytest.approx(1.0)
    assert bench["projection_available"] is True and bench["projected_speedup"] > 0


def test_what_the_check_runs_imports_without_the_store_or_prefect():
    """The bench needs torch and transformers only; the CUDA tests also pytest, hypothesis and
    pydantic (the carried wheels), never Prefect, MLflow or the store's pyarrow and DuckDB.
    Each is made absent (``None`` in ``sys.modules``: import fails, ``find_spec`` says None)."""
    code = """
import sys
for name in ("prefect", "mlflow", "pyarrow", "duckdb", "pydantic", "pytest", "hypothesis"):
    sys.modules[name] = None
import npd_core.bench.gpu
for name in ("pydantic", "pytest", "hypothesis"):
    del sys.modules[name]
sys.path.insert(0, "tests/npd_core/method")
import test_cuda_attention
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
