"""vLLM backend against the HF backend on the tiny toy world, in float32.

Tolerances are the issue's and fixed: same top-1 teacher token at ≥ 99% of response positions,
mean |Δ log-prob| ≤ 1e-3, greedy answers identical on ≥ 99% of prompts. The ``vllm`` tests need
the extra (``make vllm``) and skip with that reason without it; ``make test-vllm`` runs them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pytest
import torch

from npd_core.backends import vllm as vllm_backend
from npd_core.config import NPDConfig
from npd_core.data import read_prompts
from npd_core.errors import ConfigError
from npd_core.method.generate import generate
from npd_core.models import format_prompts, load_model, load_tokenizer, save_checkpoint
from npd_core.pipeline.spec import RunSpec
from npd_core.pipeline.stages import generate_stage, score_stage
from npd_core.seeds import seed_for
from npd_core.store import Store

PROV = {"flow_run_id": "f", "task_run_id": "t"}
OPTS = vllm_backend.EngineOptions(dtype="float32", max_num_seqs=256, max_logprobs=20, threads=1)
needs_vllm = pytest.mark.skipif(
    not vllm_backend.available(), reason="needs the vllm extra: make vllm"
)


def test_backend_resolution_and_missing_extra(monkeypatch):
    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    assert vllm_backend.resolve("auto", "generate.backend") == "hf"
    assert vllm_backend.resolve("hf", "generate.backend") == "hf"
    with pytest.raises(ConfigError) as e:
        vllm_backend.resolve("vllm", "score.backend")
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    assert msg.startswith("score.backend: 'vllm' needs the vllm extra") and "make vllm" in msg
    monkeypatch.setattr(vllm_backend, "available", lambda: True)
    assert vllm_backend.resolve("auto", "generate.backend") == "vllm"


def test_parallel_sizes_reach_the_engine_arguments():
    """orchestration.tensor_parallel_size and data_parallel_size go to vllm.LLM as they are (the
    engine process rebuilds its options from the dict it is sent); vLLM is not imported."""
    over = {"orchestration": {"tensor_parallel_size": 2, "data_parallel_size": 4}}
    opts = vllm_backend.EngineOptions.of(NPDConfig.model_validate(over))
    args = vllm_backend.engine_args("/m", vllm_backend.EngineOptions(**asdict(opts)))
    assert (args["model"], args["tensor_parallel_size"], args["data_parallel_size"]) == ("/m", 2, 4)
    assert opts.gpus == 8  # what a shard task asks a GPU cluster for
    assert vllm_backend.engine_args("/m", OPTS)["tensor_parallel_size"] == 1 == OPTS.gpus


@pytest.fixture(scope="module")
def engines():
    """Engines are kept per process (the flow's rounds reuse them); stop them after the module."""
    yield
    vllm_backend.shutdown()


def _spec(root, world, name, **cfg) -> RunSpec:
    Store(root)
    base = dict(
        rounds=1,
        models={"bf16": False},
        data={"prompts_per_round": 48},
        generate={"max_new_tokens": 24, "n_per_prompt": 2, "backend": "vllm"},
        # the default rule (none) skips the prompt-less views; compute them so both backends'
        # unconditional log-likelihoods are compared too
        filter={"compute_delta_ifd": True},
        threads=1,
    )
    for k, v in cfg.items():
        base[k] = {**base.get(k, {}), **v}
    c = NPDConfig.model_validate(base)
    return RunSpec(
        str(root),
        name,
        c.model_dump(mode="json"),
        str(world.teacher),
        str(world.student),
        str(world.train_prompts),
        str(world.eval_prompts),
    )


def _greedy_hf(model_dir, ids, eos) -> list[list[int]]:
    gens = generate(
        load_model(model_dir),
        ids,
        n_per_prompt=1,
        max_new_tokens=24,
        eos_ids={eos},
        pad_id=0,
        temperature=0.0,
        top_p=1.0,
        seeds=None,
        batch_size=64,
        bf16=False,
    )
    return [g[0].token_ids for g in gens]


@pytest.mark.vllm
@needs_vllm
@pytest.mark.usefixtures("engines")
def test_stages_store_vllm_rows_that_match_hf(tmp_path, tiny_world):
    """Generate + score through vLLM from a worker thread (as Prefect runs stages), then score
    the same samples with HF: rows say vllm, schemas equal HF's, numbers within tolerance."""
    spec = _spec(tmp_path, tiny_world, "v")
    with ThreadPoolExecutor(1) as pool:
        gen = pool.submit(generate_stage, spec, 1, PROV).result()
        sc = pool.submit(score_stage, spec, 1, PROV).result()
    store = spec.store
    samples = store.read_stage("v", 1, "generate", "samples")
    v_scores = store.read_stage("v", 1, "score", "scores")
    assert set(samples.column("backend").to_pylist()) == {"vllm"}  # no silent fallback
    assert gen.metrics.backend == sc.metrics.backend == "vllm"
    assert samples.num_rows == 96 and gen.metrics.engine_refresh_s == 0.0

    hf = _spec(tmp_path, tiny_world, "h", generate={"backend": "hf"})
    generate_stage(hf, 1, PROV)
    h_samples = store.read_stage("h", 1, "generate", "samples")
    assert set(h_samples.column("backend").to_pylist()) == {"hf"}
    assert samples.schema == h_samples.schema

    # the same vLLM samples scored by HF: same run, score.backend: hf
    spec_h = _spec(tmp_path, tiny_world, "v", score={"backend": "hf"})
    assert score_stage(spec_h, 1, PROV).metrics.backend == "hf"
    h_scores = store.read_stage("v", 1, "score", "scores")
    assert v_scores.schema == h_scores.schema

    ids_v = np.concatenate([np.asarray(x)[:, 0] for x in v_scores.column("topk_ids").to_pylist()])
    ids_h = np.concatenate([np.asarray(x)[:, 0] for x in h_scores.column("topk_ids").to_pylist()])
    top1 = float((ids_v == ids_h).mean())
    lp_v = np.concatenate([np.ravel(x) for x in v_scores.column("topk_logprobs").to_pylist()])
    lp_h = np.concatenate([np.ravel(x) for x in h_scores.column("topk_logprobs").to_pylist()])
    n_tok = samples.column("response_tokens").to_numpy().sum()
    assert len(ids_v) == n_tok > 0
    assert top1 >= 0.99
    assert np.abs(lp_v - lp_h).mean() <= 1e-3
    for col in (
        "teacher_logprob_sum",
        "teacher_resp_logprob_sum",
        "student_logprob_sum",
        "student_resp_logprob_sum",
    ):
        v, h = (s.column(col).to_numpy(zero_copy_only=False) for s in (v_scores, h_scores))
        assert np.isfinite(v).all() and np.isfinite(h).all(), col
        d = np.abs(v - h)
        assert d.sum() / n_tok <= 1e-3, col  # mean |Δ| per token


@pytest.mark.vllm
@needs_vllm
@pytest.mark.usefixtures("engines")
def test_greedy_matches_hf_and_refresh_loads_new_weights(tmp_path, tiny_world):
    tok = load_tokenizer(tiny_world.student)
    prompts = [p.prompt for p in read_prompts(tiny_world.eval_prompts)]
    ids = format_prompts(tok, prompts, "auto")
    eos = tok.eos_token_id
    kw = dict(
        n_per_prompt=1, max_new_tokens=24, eos_ids={eos}, temperature=0.0, top_p=1.0, seeds=None
    )

    out, _ = vllm_backend.generate(str(tiny_world.student), ids, options=OPTS, **kw)
    hf = _greedy_hf(tiny_world.student, ids, eos)
    assert np.mean([o[0].token_ids == h for o, h in zip(out, hf, strict=True)]) >= 0.99

    # θ_1: the same architecture, other weights → refreshed in place, not restarted
    model = load_model(tiny_world.student)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    new = save_checkpoint(model, tok, tmp_path / "round=1")
    out1, times = vllm_backend.generate(str(new), ids, options=OPTS, **kw)
    assert times.start_s == 0.0 and times.refresh_s > 0.0
    hf1 = _greedy_hf(new, ids, eos)
    assert hf1 != hf  # the new weights answer differently …
    assert np.mean([o[0].token_ids == h for o, h in zip(out1, hf1, strict=True)]) >= 0.99


@pytest.mark.vllm
@needs_vllm
@pytest.mark.usefixtures("engines")
def test_samples_depend_on_seed_not_on_batch(tiny_world):
    tok = load_tokenizer(tiny_world.student)
    ids = format_prompts(tok, [p.prompt for p in read_prompts(tiny_world.eval_prompts)], "auto")
    # 4 × 64 prompts: more prompt tokens than one engine step takes (4096), the case where a
    # chunked prefill broke seeded sampling on CPU
    kw = dict(n_per_prompt=4, max_new_tokens=24, eos_ids={tok.eos_token_id}, top_p=1.0)
    m = str(tiny_world.student)
    seeds = [[seed_for(7, "generate", 1, i, k) for k in range(4)] for i in range(len(ids))]
    done: list[int] = []
    full, _ = vllm_backend.generate(
        m, ids, temperature=1.0, seeds=seeds, options=OPTS, progress=done.append, **kw
    )
    assert sum(done) == 4 * len(ids)  # the stage's progress bar counts each sample once
    part, _ = vllm_backend.generate(
        m, ids[:5], temperature=1.0, seeds=seeds[:5], options=OPTS, **kw
    )
    other, _ = vllm_backend.generate(
        m,
        ids[:5],
        temperature=1.0,
        seeds=[[x + 1 for x in r] for r in seeds[:5]],
        options=OPTS,
        **kw,
    )
    toks = [[g.token_ids for g in x] for x in full[:5]]
    assert [[g.token_ids for g in x] for x in part] == toks
    assert [[g.token_ids for g in x] for x in other] != toks
    gens = [g for x in full for g in x]
    assert all(len(g.logprobs) == len(g.token_ids) > 0 for g in gens)
    assert all(v <= 0.0 for g in gens for v in g.logprobs)
