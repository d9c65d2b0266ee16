"""The on-policy levers in the learner's step, on hand-made data: per-sequence normalisation
(GKD's 1/L_y), the tail bucket for reverse KL and JSD, and the sampled-token reverse KL with
its per-token teacher and generator log-probs. Each: packed == padded within 1e-5 (loss and
gradients), and gradient accumulation (``micro_rows``) == the one-forward step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_qwen import FAST, PAD, make_case, qwen2, student

from npd_core.errors import TrainingError
from npd_core.method import losses
from npd_core.method.packing import IGNORE_INDEX, collate, pack
from npd_core.method.train import (
    Targets,
    accumulate,
    forward_losses,
    loss_units,
    micro_batches,
    per_token_loss,
)
from npd_core.train_spec import StepSpec

SPECS = {
    "forward_kl_per_sequence": StepSpec(normalize="sequence"),
    "reverse_kl_rest_mass": StepSpec(loss="reverse_kl", rest_mass=True),
    "jsd_rest_mass_per_sequence": StepSpec(loss="jsd", rest_mass=True, normalize="sequence"),
    "sampled_reverse_kl": StepSpec(loss="sampled_reverse_kl"),
    "sampled_reverse_kl_per_sequence": StepSpec(loss="sampled_reverse_kl", normalize="sequence"),
}


def with_tokens(targets: Targets, seed: int) -> Targets:
    """``targets`` with the teacher's and the generator's log-prob of each response token; the
    last sample has no generator (a mixed-in sequence: NaN)."""
    g = torch.Generator().manual_seed(seed)
    m = len(targets.topk_ids)
    gen = torch.log(torch.rand(m, generator=g).clamp_min(0.01))  # (M,)
    gen[targets.offsets[-1] :] = float("nan")
    teacher = torch.log(torch.rand(m, generator=g).clamp_min(0.01))
    return replace(targets, teacher_token=teacher, generator_token=gen)


def loss_and_grads(model, batch, targets, spec, padded: bool):
    model.zero_grad(set_to_none=True)
    if padded:
        out = model(input_ids=batch.input_ids, attention_mask=(batch.seq_ids >= 0).long())
    else:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    per_token = per_token_loss(out.logits, batch, targets, spec)
    loss = losses.token_mean(per_token, loss_units([batch], spec))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


samples_st = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=2, max_size=5)


@pytest.mark.parametrize("name", list(SPECS))
@settings(FAST, max_examples=8)
@given(pr=samples_st, seed=st.integers(0, 999))
@example(pr=[(3, 1), (1, 6), (2, 5), (4, 1)], seed=1)  # several sequences a row, unequal lengths
def test_packed_loss_and_gradients_equal_padded(name, pr, seed):
    samples, targets = make_case(pr, seed)
    targets = with_tokens(targets, seed)
    cap = max(p + r for p, r in pr) + 6
    rows = pack([len(s) for s in samples], cap, seed=seed)
    packed = collate(samples, rows, PAD, row_len=cap, target_offsets=targets.offsets)
    padded = collate(
        samples, [[i] for i in range(len(samples))], PAD, target_offsets=targets.offsets
    )
    spec = SPECS[name]
    assert loss_units([packed], spec) == loss_units([padded], spec)
    got, g_got = loss_and_grads(student("sdpa"), packed, targets, spec, padded=False)
    want, g_want = loss_and_grads(student("sdpa"), padded, targets, spec, padded=True)
    assert abs(got - want) <= 1e-5, (got, want)
    for key, g in g_want.items():
        assert (g_got[key] - g).abs().max() <= 1e-5, key


def test_per_sequence_normalisation_is_the_mean_of_each_sequences_token_mean():
    """Sequences of 1, 6 and 3 response tokens: per token, the 6-token one holds 6/10 of the
    step's loss; per sequence, each holds a third, its own token mean."""
    samples, targets = make_case([(2, 1), (1, 6), (3, 3)], seed=4)
    batch = collate(samples, [[0, 1, 2]], PAD, row_len=16, target_offsets=targets.offsets)
    model = student("sdpa")
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    per_token = per_token_loss(logits, batch, targets, StepSpec())  # (10,)
    seq = batch.seq_ids[batch.labels != IGNORE_INDEX]
    means = [per_token[seq == i].mean() for i in range(3)]
    spec = StepSpec(normalize="sequence")
    got = losses.token_mean(per_token_loss(logits, batch, targets, spec), loss_units([batch], spec))
    assert loss_units([batch], spec) == 3 and loss_units([batch], StepSpec()) == 10
    torch.testing.assert_close(got, torch.stack(means).mean())


@pytest.mark.parametrize("name", ["forward_kl_per_sequence", "sampled_reverse_kl_per_sequence"])
def test_accumulated_gradients_equal_the_one_forward_step(name):
    """The step's 5 rows in 1, 2, 3 or 5 forwards: the same loss and gradients within 1e-6, the
    normaliser (11 sequences) counted over the whole step before the micro-batches."""
    samples, targets = make_case([(2, 3), (1, 1), (3, 2), (2, 4), (1, 2)] * 2 + [(2, 2)], seed=5)
    targets = with_tokens(targets, 5)
    rows = [[0, 1], [2, 3, 4], [5], [6, 7], [8, 9, 10]]
    model, spec = qwen2(), SPECS[name]
    model.train()
    grads, step_losses = [], []
    for micro_rows in (5, 3, 2, 1):
        forwards = replace(spec, micro_rows=micro_rows).forwards(len(rows))
        micro = micro_batches(samples, rows, 0, forwards, 32, targets.offsets)
        assert loss_units(micro, spec) == 11

        def forward(b):
            return forward_losses(model, b, targets, spec, bf16=False)

        step_losses.append(accumulate(forward, micro, loss_units(micro, spec)).item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert step_losses == pytest.approx([step_losses[0]] * 4, abs=1e-6)
    for got in grads[1:]:
        for a, b in zip(grads[0], got, strict=True):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_the_sampled_token_loss_needs_its_per_token_log_probs():
    samples, targets = make_case([(2, 3)], seed=0)
    batch = collate(samples, [[0]], PAD, target_offsets=targets.offsets)
    with pytest.raises(TrainingError, match="per-token log-probs"):
        forward_losses(qwen2(), batch, targets, StepSpec(loss="sampled_reverse_kl"), bf16=False)
