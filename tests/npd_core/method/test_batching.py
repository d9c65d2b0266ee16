"""Memory-bounded batches: rows from a budget and the KV cache's bytes per token; an
out-of-memory error halves the batch, changes no sample, and ends in one line at one row."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config

import npd_core.method.generate as generate_mod
import npd_core.method.score as score_mod
from npd_core.config import build_config
from npd_core.data import read_prompts
from npd_core.errors import ConfigError
from npd_core.method.batching import (
    GIB,
    OutOfMemory,
    decode_row_bytes,
    halving,
    kv_bytes_per_token,
    memory_budget,
    rows_that_fit,
)
from npd_core.models import format_prompts, load_model, load_tokenizer
from npd_core.seeds import seed_for

QWEN_05B = Qwen2Config(  # Qwen2.5-0.5B's shape
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
)


def test_kv_bytes_per_token_is_layers_kv_heads_head_dim_two_bytes():
    assert kv_bytes_per_token(QWEN_05B, 2) == 24 * 2 * 64 * 2 * 2 == 12288
    assert kv_bytes_per_token(QWEN_05B, 4) == 24576
    mha = Qwen2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    mha.num_key_value_heads = None  # no GQA field: every head caches K and V
    assert kv_bytes_per_token(mha, 4) == 3 * 4 * 16 * 2 * 4


def test_budget_auto_is_unbounded_on_cpu_and_a_number_is_gib():
    cpu = torch.device("cpu")
    assert memory_budget("auto", cpu) is None
    assert memory_budget(None, cpu) is None
    assert memory_budget(1.5, cpu) == int(1.5 * GIB)


def test_rows_that_fit_the_budget_at_most_the_cap_at_least_one():
    assert rows_that_fit(None, 256, lambda n: 10**9) == 256  # no budget: the count decides
    assert rows_that_fit(1000, 256, lambda n: 10) == 100
    assert rows_that_fit(1000, 64, lambda n: 10) == 64
    assert rows_that_fit(1000, 256, lambda n: 10 * n) == 10  # rows grow longer: 10 × 100
    assert rows_that_fit(5, 256, lambda n: 10) == 1  # one row always runs
    # a 0.5B model decoding 1,024-token rows in bf16 with 8 GiB: KV 12 MiB + logits 2.3 MiB a row
    row = 1024 * 12288 + 4 * 4 * 151936
    assert rows_that_fit(8 * GIB, 1024, lambda n: row) == 8 * GIB // row == 572


def _oom_above(limit: int, calls: list[tuple[int, int]]):
    def run(start: int, end: int) -> list[int]:
        calls.append((start, end))
        if end - start > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(range(start, end))

    return run


def test_halving_retries_the_same_units_at_half_the_batch_and_keeps_the_smaller_size():
    calls: list[tuple[int, int]] = []
    logged: list[str] = []
    out = list(
        halving(
            "generate",
            40,
            lambda s, cap: min(cap, 16),
            _oom_above(3, calls),
            lambda s: 0,
            log=logged.append,
        )
    )
    assert [x for _, _, r in out for x in r] == list(range(40))  # every unit once, in order
    assert calls[:4] == [(0, 16), (0, 8), (0, 4), (0, 2)]  # the same batch, halved
    assert {e - s for s, e, _ in out} == {2}  # and the stage's later batches stay at 2
    assert logged == [
        "generate: out of device memory at a batch of 16; retrying at 8",
        "generate: out of device memory at a batch of 8; retrying at 4",
        "generate: out of device memory at a batch of 4; retrying at 2",
    ]


def test_out_of_memory_at_one_row_is_one_line_naming_stage_and_memory():
    calls: list[tuple[int, int]] = []
    with pytest.raises(OutOfMemory) as err:
        list(
            halving(
                "score (teacher)",
                5,
                lambda s, cap: cap,
                _oom_above(0, calls),
                lambda s: 3 * GIB,
                unit="packed row",
                log=lambda m: None,
            )
        )
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("score (teacher): out of device memory with a batch of one packed row")
    assert "about 3.00 GiB beyond the weights" in msg
    assert [e - s for s, e in calls] == [5, 2, 1]


@pytest.fixture(scope="module")
def student(tiny_world):
    tok = load_tokenizer(tiny_world.student)
    texts = [p.prompt for p in read_prompts(tiny_world.train_prompts)][:24]
    return load_model(tiny_world.student), tok, format_prompts(tok, texts, "auto")


def _generate(model, tok, ids, **kw):
    seeds = [[seed_for(0, "generate", 1, f"p{i}", k) for k in range(2)] for i in range(len(ids))]
    gens = generate_mod.generate(
        model,
        ids,
        n_per_prompt=2,
        max_new_tokens=16,
        eos_ids={tok.eos_token_id},
        pad_id=tok.pad_token_id,
        temperature=1.0,
        top_p=1.0,
        seeds=seeds,
        bf16=False,
        **kw,
    )
    return [[g.token_ids for g in row] for row in gens]


def test_generation_halved_by_out_of_memory_gives_identical_samples(student, monkeypatch, capsys):
    model, tok, ids = student
    ref = _generate(model, tok, ids, batch_size=256)
    sizes: list[int] = []
    real = generate_mod.sample_batch

    def small_gpu(model, prompts, **kw):  # a device that holds 6 rows at most
        sizes.append(len(prompts))
        if len(prompts) > 6:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, prompts, **kw)

    monkeypatch.setattr(generate_mod, "sample_batch", small_gpu)
    assert _generate(model, tok, ids, batch_size=48, stage="evaluate") == ref
    assert sizes[:4] == [48, 24, 12, 6] and set(sizes[4:]) == {6}
    err = capsys.readouterr().err
    assert "evaluate: out of device memory at a batch of 48; retrying at 24" in err


def test_a_memory_budget_bounds_the_rows_and_changes_no_sample(student, monkeypatch):
    model, tok, ids = student
    ref = _generate(model, tok, ids, batch_size=256)
    sizes: list[int] = []
    real = generate_mod.sample_batch
    monkeypatch.setattr(
        generate_mod, "sample_batch", lambda m, p, **kw: sizes.append(len(p)) or real(m, p, **kw)
    )
    longest = max(len(x) for x in ids) + 16
    budget = 10 * decode_row_bytes(model, longest, bf16=False)  # ≥ 10 rows of any length
    assert _generate(model, tok, ids, batch_size=256, memory=budget) == ref
    assert 10 <= max(sizes) < 48 and sum(sizes) == 48


def test_scoring_halved_by_out_of_memory_gives_the_same_scores(student, monkeypatch):
    model, tok, ids = student
    resp = [r for row in _generate(model, tok, ids, batch_size=256) for r in row]
    prompts = [x for x in ids for _ in range(2)]
    kw = dict(view=None, top_k=4, batch_tokens=4096, bf16=False)
    ref = score_mod.score(model, prompts, resp, **kw)
    real = score_mod.response_scores
    rows: list[int] = []

    def small_gpu(model, batch, **kw):
        rows.append(batch.input_ids.shape[0])
        if batch.input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, batch, **kw)

    monkeypatch.setattr(score_mod, "response_scores", small_gpu)
    out = score_mod.score(model, prompts, resp, **kw)
    assert rows[0] > 3 and rows[-1] <= 3  # halved from the whole stage in one forward
    assert out.cond_logprob_sum == pytest.approx(ref.cond_logprob_sum, abs=1e-5)
    for a, b in zip(out.topk_logprobs, ref.topk_logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("bad", [0, -1, "x", True])
def test_memory_gb_takes_auto_or_positive_gib(bad):
    assert build_config({"generate": {"memory_gb": 2}}).generate.memory_gb == 2.0
    assert build_config({}).score.memory_gb == "auto"
    with pytest.raises(ConfigError, match="field 'eval.memory_gb'.*GiB > 0, or auto"):
        build_config({"eval": {"memory_gb": bad}})


def test_without_halving_the_out_of_memory_error_propagates():
    """What a benchmark timing one batch size asks for (``generate(halve_on_oom=False)``)."""
    calls: list[tuple[int, int]] = []
    with pytest.raises(torch.OutOfMemoryError):
        list(
            halving("bench", 8, lambda s, cap: cap, _oom_above(3, calls), lambda s: 0, halve=False)
        )
    assert calls == [(0, 8)]
