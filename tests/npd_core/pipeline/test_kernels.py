"""The run's packed-attention kernels (npd_core/pipeline/kernels.py): chosen once, recorded in
the spec, reused by a retry or a resume without measuring again; pinned knobs and
``NPD_ATTENTION`` never measure; a spec saved before the choice existed keeps the fixed kernels."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen2Config

from npd_core.config import NPDConfig
from npd_core.errors import ConfigError
from npd_core.method.attention import SDPA, VARLEN
from npd_core.pipeline import kernels
from npd_core.pipeline.autotune import Choice, Shape, unavailable
from npd_core.pipeline.spec import RunSpec


def _spec(tmp_path, **cfg) -> RunSpec:
    for name in ("teacher", "student"):  # a config.json is all the choice reads of a model
        Qwen2Config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1).save_pretrained(
            tmp_path / name
        )
    config = NPDConfig.model_validate(cfg).model_dump(mode="json")
    return RunSpec(
        str(tmp_path), "run", config, str(tmp_path / "teacher"), str(tmp_path / "student"), "a", "b"
    )


@pytest.fixture
def measured(monkeypatch):
    """``auto`` measures (NPD_ATTENTION unset); every measurement picks sdpa and is counted.
    The shapes are fixed (no prompts or tokenizer needed)."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    calls = []
    shape = Shape.bucket(backward=True, rows=2, row_len=64, seq_len=16, threads=1)
    monkeypatch.setattr(kernels, "stage_shapes", lambda *a: {"train": shape, "score": shape})

    def select(config, shape, cache=None):
        calls.append(shape)
        return Choice(SDPA, "measured", "k", {SDPA: 0.001, VARLEN: 0.002})

    monkeypatch.setattr(kernels, "select", select)
    return calls


def test_the_choice_is_recorded_in_the_spec_and_a_retry_reuses_it(tmp_path, measured):
    spec = kernels.choose_attention(_spec(tmp_path, filter={"rule": "band"}), log=lambda m: None)
    # a Δ-IFD rule scores the student's views too: three roles; the learner's is measured, and
    # scoring on CPU is per sequence, unmeasured (its scores must not depend on the sharding)
    assert spec.attention == {"train": SDPA, "score_teacher": VARLEN, "score_student": VARLEN}
    assert len(measured) == 1
    spec.save()
    again = RunSpec.load(tmp_path, "run")  # what `npd retry` and a UI retry start from
    assert again.attention == spec.attention and again.kernel("train") == SDPA
    assert kernels.choose_attention(again, log=lambda m: None) is again
    assert len(measured) == 1  # nothing measured again


def test_a_spec_saved_before_the_choice_existed_keeps_the_fixed_kernels(tmp_path, measured):
    spec = _spec(tmp_path)
    spec.attention = {"train": SDPA}
    path = spec.save()
    old = json.loads(path.read_text())
    del old["attention"]
    path.write_text(json.dumps(old))
    loaded = RunSpec.load(tmp_path, "run")
    assert loaded.attention == {} and loaded.kernel("train") is None  # → attention.FIXED
    assert kernels.choose_attention(loaded, log=lambda m: None).attention == {}
    assert measured == []


def test_pinned_knobs_and_the_environment_never_measure(tmp_path, measured, monkeypatch):
    pinned = _spec(
        tmp_path,
        train={"attention": "sdpa"},
        score={"attention": "sdpa_varlen"},
        filter={"rule": "band"},
    )
    chosen = kernels.choose_attention(pinned, log=lambda m: None)
    assert chosen.attention == {"train": SDPA, "score_teacher": VARLEN, "score_student": VARLEN}
    monkeypatch.setenv(kernels.ENV, "fixed")  # what the test suite runs with
    fixed = kernels.choose_attention(_spec(tmp_path, filter={"rule": "none"}), log=lambda m: None)
    assert fixed.attention == {"train": VARLEN, "score_teacher": VARLEN}  # per sequence
    monkeypatch.setenv(kernels.ENV, "sdpa")  # pins scoring too
    assert kernels.choose_attention(_spec(tmp_path)).attention == {
        "train": SDPA,
        "score_teacher": SDPA,
    }
    assert measured == []
    monkeypatch.setenv(kernels.ENV, "flex")
    with pytest.raises(ConfigError, match="NPD_ATTENTION='flex': use fixed or one of"):
        kernels.choose_attention(_spec(tmp_path))


def test_vllm_scoring_measures_only_the_learner(tmp_path, measured):
    spec = kernels.choose_attention(
        _spec(tmp_path, generate={"backend": "vllm"}), log=lambda m: None
    )
    assert spec.attention == {"train": SDPA} and len(measured) == 1


def test_the_stage_shapes_come_from_the_runs_prompts_and_knobs(tmp_path, tiny_world):
    """Before any sample exists: the learner's rows are ``pack.max_seq_len`` long, a sequence
    is a prompt with its reference answer (the toy's prompts have answers); scoring rows hold
    the longest prompt plus ``max_new_tokens``; both on the stage's threads."""
    cfg = NPDConfig.model_validate(
        dict(generate={"max_new_tokens": 20}, pack={"max_seq_len": 256}, staleness=0, threads=3)
    )
    spec = RunSpec(
        str(tmp_path),
        "run",
        cfg.model_dump(mode="json"),
        str(tiny_world.teacher),
        str(tiny_world.student),
        str(tiny_world.train_prompts),
        str(tiny_world.eval_prompts),
    )
    shapes = kernels.stage_shapes(spec, cfg, "cpu")
    train, score = shapes["train"], shapes["score"]
    assert train.backward and not score.backward
    assert train.row_len == 256 and train.rows == 4 and train.threads == score.threads == 3
    assert 10 < train.seq_len <= score.row_len <= 64 and score.dtype == "float32"


def test_a_pinned_kernel_is_refused_where_it_cannot_run_saying_why():
    """``train.attention: torch_varlen`` on a machine without what it needs (here: no CUDA)
    stops before the run with the reason; a CPU kernel runs anywhere."""
    if unavailable("cuda").get("torch_varlen"):
        with pytest.raises(ConfigError, match="train.attention: torch_varlen cannot run here"):
            kernels._runs_here("train.attention", "torch_varlen")
    kernels._runs_here("train.attention", "sdpa_varlen")
