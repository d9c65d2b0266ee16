"""``filter.score: learner_ratio`` in the train step: each sequence's learner ratio from the
learner's own forward equals a known drift from its generator; a fence over the step's ratios
gives the planted stale sequence weight 0, and the step's gradient is then that of the step
without it (its tokens leave the normaliser too); a fixed source is exempt; ``micro_rows`` 1
gives the one-forward step's weights and gradients."""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch
from tiny_qwen import make_case, qwen2

from npd_core.config import FilterConfig
from npd_core.method.filter import step_weights
from npd_core.method.optim import make_optimizer
from npd_core.method.packing import IGNORE_INDEX, collate
from npd_core.method.train import (
    learner_logprobs,
    micro_batches,
    ratio_weights,
    step_gradients,
    train_round,
)
from npd_core.train_spec import StepSpec

ROWS = [[0, 1], [2, 3, 4], [5], [6, 7], [8, 9, 10]]  # one step of 5 packed rows, 11 samples
PR = [(3, 5), (6, 2), (2, 7), (4, 4), (5, 1), (2, 3), (3, 6), (7, 2), (2, 2), (4, 5), (3, 3)]
STALE, FIXED = 3, 7  # the planted stale sample, and one from a fixed source (no generator)
FENCE = FilterConfig(rule="fence", score="learner_ratio", k=3.0)


def _case(drift: list[float]):
    """The tiny float32 Qwen2, the 11 samples and targets whose generator log-probs are the
    learner's own, each sample forwarded alone (one per row), minus ``drift[i]`` per token:
    sample i's learner ratio is ``drift[i]`` (NaN: no generator)."""
    model = qwen2().eval()
    samples, targets = make_case(PR, seed=5)
    alone = collate(samples, [[i] for i in range(len(samples))], 0, None, targets.offsets)
    at = alone.labels != IGNORE_INDEX
    own = learner_logprobs(model, alone, StepSpec(), bf16=False)  # (M,)
    gen = torch.empty(len(targets.topk_ids))
    gen[alone.target_index[at]] = own - torch.tensor(drift)[alone.seq_ids[at]]
    return model, samples, replace(targets, generator_token=gen)


def _drift() -> list[float]:
    drift = [0.01 * (i % 3 - 1) for i in range(len(PR))]  # −0.01, 0, 0.01: the fresh ones
    drift[STALE], drift[FIXED] = 3.0, float("nan")
    return drift


def test_the_learner_ratio_is_the_known_drift_from_the_generator():
    drift = _drift()
    model, samples, targets = _case(drift)
    micro = micro_batches(samples, ROWS, 0, 1, 32, targets.offsets)
    w = ratio_weights(
        model, micro, targets, StepSpec(), partial(step_weights, cfg=FENCE), bf16=False
    )
    assert w.index.tolist() == list(range(len(PR)))
    want = torch.tensor(drift)
    torch.testing.assert_close(w.ratio, want, atol=1e-5, rtol=0, equal_nan=True)
    chunked = ratio_weights(
        model, micro, targets, StepSpec(loss_chunk_tokens=5), lambda r: r * 0 + 1, bf16=False
    )  # the LM head 5 positions at a time
    torch.testing.assert_close(chunked.ratio, want, atol=1e-5, rtol=0, equal_nan=True)


def _gradients(model, micro, targets, spec, weights=None) -> list[torch.Tensor]:
    step_gradients(model, micro, targets, spec, bf16=False, weights=weights)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_a_fenced_stale_sample_weighs_nothing_and_leaves_the_normaliser(normalize):
    """Fence k = 3 over the step's ratios (median 0, MAD 0.01): the stale sample (ratio 3)
    weighs 0, the fixed source (no ratio) 1, every other 1; the step's gradient equals, within
    1e-6, that of the same step with the stale sample taken out of its row."""
    model, samples, targets = _case(_drift())
    spec = StepSpec(normalize=normalize)
    micro = micro_batches(samples, ROWS, 0, 1, 32, targets.offsets)
    w = ratio_weights(model, micro, targets, spec, partial(step_weights, cfg=FENCE), bf16=False)
    assert w.weight.tolist() == [0.0 if i == STALE else 1.0 for i in range(len(PR))]
    weighed = _gradients(model, micro, targets, spec, w)
    without = [[i for i in row if i != STALE] for row in ROWS]
    plain = _gradients(
        model, micro_batches(samples, without, 0, 1, 32, targets.offsets), targets, spec
    )
    for a, b in zip(weighed, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_one_row_a_forward_gives_the_one_forward_weights_and_gradients():
    """``micro_rows`` 1 (5 forwards, the ratios of every one taken before any backward) and
    the whole step in one forward: the same weights (V-trace clipped at 1.005, the stale
    sample 0) and gradients within 1e-6."""
    model, samples, targets = _case(_drift())
    clip = partial(step_weights, cfg=FENCE.model_copy(update={"ratio_clip": 1.005}))
    got = []
    for forwards in (1, len(ROWS)):
        micro = micro_batches(samples, ROWS, 0, forwards, 32, targets.offsets)
        w = ratio_weights(model, micro, targets, StepSpec(), clip, bf16=False)
        got.append((w, _gradients(model, micro, targets, StepSpec(), w)))
    (one, g1), (each, g5) = got
    torch.testing.assert_close(each.weight, one.weight, atol=1e-6, rtol=0)
    assert one.weight[STALE] == 0 and one.weight[FIXED] == 1
    assert one.weight[0] == pytest.approx(torch.exp(torch.tensor(-0.01)).item(), abs=1e-5)
    assert one.weight[2] == pytest.approx(1.005, abs=1e-6)  # exp(0.01) > 1.005: clipped
    for a, b in zip(g1, g5, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_a_round_records_every_steps_weights():
    """``train_round`` with ``weigh``: one StepWeights a step, by step, over that step's
    samples; the stale sample weighs 0 in the first step (its ratio drifts as it learns)."""
    model, samples, targets = _case(_drift())
    spec = StepSpec(lr=1e-3, warmup_steps=0, steps_per_round=2, rows_per_step=5, micro_rows=2)
    stats = train_round(
        copy.deepcopy(model), make_optimizer(model, spec), samples, targets, ROWS, spec, 32,
        start_step=4, total_steps=6, seed=0, pad_id=0, bf16=False,
        weigh=partial(step_weights, cfg=FENCE),
    )  # fmt: skip
    assert sorted(stats.weights) == [4, 5]
    first = stats.weights[4]
    assert first.index.tolist() == list(range(len(PR))) and first.weight[STALE] == 0
