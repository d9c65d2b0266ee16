"""The on-policy baseline's pieces: one teacher forward gives the scoring stage's targets, the
mini-batch stream, the lr horizon, and budgeted segments that resume where they stopped (on a
clock that only the steps advance, so the test does not depend on the machine's speed)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from npd_core.baselines import budget, onpolicy
from npd_core.baselines.budget import CALIBRATION_STEPS, Learner, batch_indices
from npd_core.baselines.onpolicy import onpolicy_segment, teacher_topk
from npd_core.config import NPDConfig
from npd_core.method.packing import Sample, collate
from npd_core.method.score import score
from npd_core.method.train import optimizer_step
from npd_core.models import load_model, load_tokenizer, load_trainer_state
from npd_core.pipeline.spec import RunSpec
from npd_core.store import Store


def test_teacher_topk_equals_the_score_stage(tiny_world):
    """One padded forward gives the same top-k (and per-token log-probs) the scoring stage
    stores for NPD."""
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
        view=None,
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
        np.testing.assert_allclose(  # the sampled-token loss's log p_T(y_t)
            got.teacher_token[off : off + n].numpy(), ref.token_logprobs[i], atol=1e-5
        )


def test_batch_indices_cover_every_prompt_once_per_epoch():
    stream = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(10, 4, 2, seed=3) == stream[8:12]  # a function of the step alone
    assert stream[:10] != list(range(10))  # shuffled
    assert batch_indices(3, 7, 0, seed=0)[:3] != [] and len(batch_indices(3, 7, 0, seed=0)) == 7


def test_lr_horizon_follows_the_measured_step_time_and_refits_on_drift():
    lrn = Learner(model=None, tok=None, optimizer=None)
    lrn.start()
    for _ in range(CALIBRATION_STEPS):
        lrn._t0 -= 2.0  # every step takes 2 s of clock
        lrn.stepped(0.5, 1e-3, 100, 2.0, budget_s=100.0, warmup=0)
    # 5 steps in 10 s; the remaining 90 s hold 45 more
    assert lrn.step == CALIBRATION_STEPS and lrn.total_steps == CALIBRATION_STEPS + 45
    lrn._t0 -= 2.0
    lrn.stepped(0.5, 1e-3, 100, 2.0, budget_s=100.0, warmup=0)
    assert lrn.total_steps == 50 and "horizon_refits" not in lrn.counters  # on course
    # a slow step: at 18.8 s, 6 steps since the first took 2.8 s each; 81.2 s left hold 29
    lrn._t0 -= 6.8
    lrn.stepped(0.5, 1e-3, 100, 6.8, budget_s=100.0, warmup=0)
    assert lrn.total_steps == 7 + 29 and lrn.counters["horizon_refits"] == 1  # > 10% off 50
    lrn._t0 -= 2.8  # on the new pace: 8 + 28 = 36 again, no refit
    lrn.stepped(0.5, 1e-3, 100, 2.8, budget_s=100.0, warmup=0)
    assert lrn.total_steps == 36 and lrn.counters["horizon_refits"] == 1


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


class StepClock:
    """The segments' clock, advanced only by the work of a step: generating 0.1 s, scoring
    0.05 s, the optimizer step 0.15 s. So a step takes exactly 0.3 s of training clock and where
    a segment stops does not depend on the machine (loading and saving take no clock)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    @staticmethod
    def time() -> float:
        return time.time()

    def costs(self, fn, seconds: float):
        def timed(*args, **kw):
            out = fn(*args, **kw)
            self.now += seconds
            return out

        return timed


def test_onpolicy_segments_stop_on_the_clock_and_resume(spec, monkeypatch):
    clock = StepClock()
    for module in (onpolicy, budget):
        monkeypatch.setattr(module, "time", clock)
    for name, seconds in (("generate", 0.1), ("teacher_topk", 0.05), ("optimizer_step", 0.15)):
        monkeypatch.setattr(onpolicy, name, clock.costs(getattr(onpolicy, name), seconds))
    a = onpolicy_segment(spec, 1, until_s=1.0, budget_s=2.0, prompts_per_step=8)
    b = onpolicy_segment(spec, 2, until_s=2.0, budget_s=2.0, prompts_per_step=8)
    ma, mb = a.metrics, b.metrics
    # steps start at 0, 0.3, 0.6, 0.9 (< 1.0): the fourth ends the segment at 1.2
    assert ma["steps"] == ma["step"] == 4 and ma["clock_s"] == pytest.approx(1.2)
    # the second segment continues the count and the clock: steps at 1.2, 1.5, 1.8 → 2.1
    assert mb["steps"] == 3 and mb["step"] == ma["step"] + mb["steps"] == 7
    assert mb["clock_s"] == pytest.approx(2.1)
    c = mb["counters"]
    assert (c["generate_s"], c["score_s"], c["train_s"]) == pytest.approx((0.7, 0.35, 1.05))
    assert c["generated_tokens"] > 0 and c["train_tokens"] > c["generated_tokens"]
    assert all(np.isfinite(x["loss"]) for x in mb["log"])
    state = load_trainer_state(Path(spec.checkpoint(2)))
    assert state["step"] == mb["step"] and state["clock_s"] == pytest.approx(mb["clock_s"])
    # the lr horizon, fixed at step 5 (clock 1.5, 0.3 s a step since the first): the 2 steps
    # that fit the 0.5 s left, rounded, after the 5 taken
    assert CALIBRATION_STEPS == 5 and state["total_steps"] == 7
    rows = spec.store.query("select round, step from checkpoints order by round").to_pylist()
    assert [(r["round"], r["step"]) for r in rows if r["round"] > 0] == [(1, 4), (2, 7)]


def test_onpolicy_steps_forward_micro_rows_at_a_time(spec, monkeypatch):
    """``train.micro_rows: 3``: an on-policy step's samples (one a row) go through the student
    at most 3 at a time, in NPD's accumulation path (``optimizer_step`` on micro-batches)."""
    config = {**spec.config, "train": {**spec.config["train"], "micro_rows": 3}}
    clock = StepClock()
    for module in (onpolicy, budget):
        monkeypatch.setattr(module, "time", clock)
    seen = []

    def step(model, optimizer, micro, *args, **kw):
        seen.append([len(b.input_ids) for b in micro])
        clock.now += 1.0  # one step ends the segment
        return optimizer_step(model, optimizer, micro, *args, **kw)

    monkeypatch.setattr(onpolicy, "optimizer_step", step)
    res = onpolicy_segment(replace(spec, config=config), 1, 0.5, 1.0, prompts_per_step=4)
    (rows,) = seen
    assert res.metrics["steps"] == 1 and np.isfinite(res.metrics["log"][0]["loss"])
    assert len(rows) == -(-sum(rows) // 3) and max(rows) <= 3 and max(rows) - min(rows) <= 1


def test_onpolicy_trains_the_sampled_token_loss_on_its_own_samples(spec, monkeypatch):
    """``train.loss: sampled_reverse_kl`` on-policy: the generator is the current student, so
    the targets carry its sampling log-probs beside the teacher's, and the step trains."""
    config = {**spec.config, "train": {**spec.config["train"], "loss": "sampled_reverse_kl"}}
    clock = StepClock()
    for module in (onpolicy, budget):
        monkeypatch.setattr(module, "time", clock)
    seen = []

    def step(model, optimizer, micro, targets, *args, **kw):
        seen.append(targets)
        clock.now += 1.0  # one step ends the segment
        return optimizer_step(model, optimizer, micro, targets, *args, **kw)

    monkeypatch.setattr(onpolicy, "optimizer_step", step)
    res = onpolicy_segment(replace(spec, config=config), 1, 0.5, 1.0, prompts_per_step=4)
    (targets,) = seen
    assert res.metrics["steps"] == 1 and np.isfinite(res.metrics["log"][0]["loss"])
    gen, teacher = targets.generator_token, targets.teacher_token
    assert gen.shape == teacher.shape == (len(targets.topk_ids),)
    assert torch.isfinite(gen).all() and (gen <= 0).all() and (teacher <= 0).all()
