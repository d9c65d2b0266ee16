"""``scripts/device-check``: its CPU path (``--tiny``) runs the CUDA tests (which skip) and the
GPU bench at toy sizes and writes the JSON the GPU run writes; what it runs imports nothing a
box with only torch and transformers lacks, beyond the wheels the script carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npd_core.bench.gpu import SECTIONS
from npd_core.pipeline.autotune import KERNELS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device-check"


def skip_without_cuda() -> list[str]:
    """The test files that skip where CUDA is missing (they ask torch, then skip)."""
    found = []
    for f in sorted((ROOT / "tests").rglob("test_*.py")):
        text = f.read_text() if f != Path(__file__).resolve() else ""
        if "cuda.is_available()" in text and ("pytest.skip(" in text or "skipif(" in text):
            found.append(str(f.relative_to(ROOT)))
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("device-check")
    env = {**os.environ, "OUT": str(out)}
    cmd = [sys.executable, str(SCRIPT), "--tiny"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "device-check.json").read_text())
    assert json.loads(r.stdout) == summary  # stdout: the same summary
    return out, summary


def test_the_tiny_check_runs_every_test_that_needs_cuda(tiny):
    _, summary = tiny
    assert summary["ok"] and summary["tiny"] and 0 < summary["wall_s"] <= summary["budget_s"]
    tests = summary["tests"]
    assert tests["files"] == skip_without_cuda()
    assert (tests["rc"], tests["failed"], tests["errors"], tests["failures"]) == (0, 0, 0, [])
    assert tests["passed"] >= 1 and not tests["timed_out"]
    cases = 2 * len(KERNELS["cuda"])  # each CUDA kernel in bf16 and fp32: skipped here
    assert tests["skipped"] == cases == sum(tests["skip_reasons"].values())


def test_the_tiny_check_reports_the_benchs_figures(tiny):
    out, summary = tiny
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
