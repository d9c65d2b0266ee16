"""The on-policy baseline's pieces: one teacher forward gives the scoring stage's targets, the
mini-batch stream, the lr horizon, and budgeted segments that resume where they stopped."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from npd_core.baselines.budget import CALIBRATION_STEPS, Learner, batch_indices
from npd_core.baselines.onpolicy import onpolicy_segment, teacher_topk
from npd_core.config import NPDConfig
from npd_core.method.packing import Sample, collate
from npd_core.method.score import score
from npd_core.models import load_model, load_tokenizer, load_trainer_state, start_token_id
from npd_core.pipeline.stages import RunSpec
from npd_core.store import Store


def test_teacher_topk_equals_the_score_stage(tiny_world):
    """One padded forward gives the same top-k the scoring stage stores for NPD."""
    tok = load_tokenizer(tiny_world.teacher)
    teacher = load_model(tiny_world.teacher)
    prompts = [tok("12,34=")["input_ids"], tok("5,77,31=")["input_ids"]]
    responses = [tok("12,34")["input_ids"] + [tok.eos_token_id], tok("5,31,77")["input_ids"]]
    samples = [Sample(p, r) for p, r in zip(prompts, responses, strict=True)]
    offsets = [0, len(responses[0])]
    batch = collate(samples, [[0], [1]], tok.pad_token_id, target_offsets=offsets)
    got = teacher_topk(teacher, batch, offsets, top_k=4, bf16=False)
    ref = score(
        teacher,
        prompts,
        responses,
        start_id=start_token_id(tok),
        top_k=4,
        batch_tokens=4096,
        bf16=False,
    )
    assert got.topk_ids.shape == (sum(map(len, responses)), 4)
    for i, off in enumerate(offsets):
        n = len(responses[i])
        assert torch.equal(got.topk_ids[off : off + n], torch.from_numpy(ref.topk_ids[i]).long())
        np.testing.assert_allclose(
            got.topk_logprobs[off : off + n].numpy(), ref.topk_logprobs[i], atol=1e-5
        )


def test_batch_indices_cover_every_prompt_once_per_epoch():
    stream = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(10, 4, 2, seed=3) == stream[8:12]  # a function of the step alone
    assert stream[:10] != list(range(10))  # shuffled
    assert batch_indices(3, 7, 0, seed=0)[:3] != [] and len(batch_indices(3, 7, 0, seed=0)) == 7


def test_lr_horizon_is_fixed_from_the_measured_step_time():
    lrn = Learner(model=None, tok=None, optimizer=None)
    lrn.start()
    for _ in range(CALIBRATION_STEPS):
        lrn._t0 -= 2.0  # every step takes 2 s of clock
        lrn.stepped(0.5, 1e-3, 100, 2.0, budget_s=100.0, warmup=0)
    # 5 steps in 10 s; the remaining 90 s hold 45 more
    assert lrn.step == CALIBRATION_STEPS and lrn.total_steps == CALIBRATION_STEPS + 45
    lrn._t0 -= 2.0
    lrn.stepped(0.5, 1e-3, 100, 2.0, budget_s=100.0, warmup=0)
    assert lrn.total_steps == 50  # fixed once


@pytest.fixture
def spec(tmp_path, tiny_world) -> RunSpec:
    cfg = NPDConfig.model_validate(
        dict(
            threads=1,
            data={"eval_size": 16},
            generate={"max_new_tokens": 24},
            train={"warmup_steps": 2},
            pack={"max_seq_len": 128},
        )
    )
    Store(tmp_path)
    w = tiny_world
    return RunSpec(
        str(tmp_path),
        "op",
        cfg.model_dump(mode="json"),
        str(w.teacher),
        str(w.student),
        str(w.train_prompts),
        str(w.eval_prompts),
    )


def test_onpolicy_segments_stop_on_the_clock_and_resume(spec):
    t0 = time.perf_counter()
    a = onpolicy_segment(spec, 1, until_s=1.0, budget_s=2.0, prompts_per_step=8)
    b = onpolicy_segment(spec, 2, until_s=2.0, budget_s=2.0, prompts_per_step=8)
    assert time.perf_counter() - t0 < 30
    ma, mb = a.metrics, b.metrics
    assert ma["steps"] >= 1 and ma["clock_s"] >= 1.0
    assert mb["step"] == ma["step"] + mb["steps"]  # the second segment continued the count
    assert mb["clock_s"] >= 2.0 and mb["clock_s"] - 2.0 < 2.0  # stops after the step past 2 s
    c = mb["counters"]
    assert c["generate_s"] + c["score_s"] + c["train_s"] <= mb["clock_s"]
    assert c["generated_tokens"] > 0 and c["train_tokens"] > c["generated_tokens"]
    assert all(np.isfinite(x["loss"]) for x in mb["log"])
    state = load_trainer_state(Path(spec.checkpoint(2)))
    assert state["step"] == mb["step"] and state["clock_s"] == pytest.approx(mb["clock_s"])
    # the lr horizon, fixed after the first steps, is close to the steps that fit the budget
    assert mb["step"] >= CALIBRATION_STEPS and 0.5 < state["total_steps"] / mb["step"] < 2
    rows = spec.store.query("select round, step from checkpoints order by round").to_pylist()
    assert [r["round"] for r in rows if r["round"] > 0] == [1, 2]
