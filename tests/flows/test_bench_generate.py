"""``npd bench generate --json``: one JSON object on stdout with the HF figures, and the vLLM
ones where vLLM is installed (the same test covers both installs)."""

from __future__ import annotations

import json
import subprocess

from resume_checks import NPD

from npd_core.backends import vllm as vllm_backend


def test_bench_generate_json(tiny_world):
    args = [
        *("bench", "generate", "--json", "--n-prompts", "16", "--max-new-tokens", "8"),
        *("--batch-size", "16", "--top-k", "4", "--model", str(tiny_world.student)),
        *("--teacher", str(tiny_world.teacher), "--prompts", str(tiny_world.train_prompts)),
    ]
    p = subprocess.run([*NPD, *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)  # exactly one JSON object, nothing else on stdout
    assert (res["n_prompts"], res["n_per_prompt"], res["max_new_tokens"]) == (16, 1, 8)
    assert res["device"] and res["dtype"] == "float32"
    assert 16 <= res["hf_generated_tokens"] <= 16 * 8
    assert res["hf_tokens_per_s"] > 0 and res["score_hf_tokens_per_s"] > 0
    # the per-sample sampler is timed beside the one it replaced, on the run's logits shape
    assert res["sampler_multinomial_ms"] > 0 and res["sampler_gumbel_ms"] > 0
    assert isinstance(res["sampler_slowdown"], float)
    if not vllm_backend.available():
        assert res["vllm"] == "missing: make vllm (scripts/install-vllm.sh)"
        assert res["vllm_tokens_per_s"] is None and res["speedup"] is None
        assert "vLLM is not installed" in p.stderr
        return
    assert res["speedup"] == res["vllm_tokens_per_s"] / res["hf_tokens_per_s"]
    assert res["score_speedup"] == res["score_vllm_tokens_per_s"] / res["score_hf_tokens_per_s"]
    assert res["score_top1_agreement"] >= 0.99 and res["score_mean_abs_diff"] <= 1e-3
