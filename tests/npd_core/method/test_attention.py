"""Attention over packed rows: the varlen kernel equals SDPA with a block-diagonal mask, and in
a packed row (``position_ids`` restarting per sequence) no sequence sees another, under every
attention implementation the trainer may use; without a choice the learner keeps the fixed
kernel (the choice itself: tests/npd_core/pipeline/test_autotune.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_qwen import ATTENTIONS, FAST, PAD, VOCAB, make_case, student

from npd_core.method import attention
from npd_core.method.packing import Sample, collate


def test_varlen_attention_equals_sdpa_with_a_block_diagonal_mask_under_gqa():
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]])  # (B, T)
    q = torch.randn(2, 4, 8, 16)  # (B, H, T, D)
    k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)  # 2 kv heads
    seg = (pos == 0).cumsum(-1)  # (B, T)
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & torch.ones(8, 8).bool().tril()
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)  # (B, T, H, D)
    got, _ = attention.sdpa_varlen_attention(None, q, k, v, None, position_ids=pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
@FAST
@given(
    pr=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=2, max_size=6),
    data=st.data(),
)
def test_changing_one_sequence_leaves_the_others_logits_unchanged(attention, pr, data):
    samples, _ = make_case(pr, seed=0)
    i = data.draw(st.integers(0, len(samples) - 1), label="perturbed")
    cap = sum(p + r for p, r in pr) + data.draw(st.integers(0, 5), label="pad")
    rows = [list(range(len(samples)))]  # all in one row
    new = samples.copy()
    new[i] = Sample(
        [(t + 7) % (VOCAB - 1) + 1 for t in samples[i].prompt_ids],
        [(t + 3) % (VOCAB - 1) + 1 for t in samples[i].response_ids],
    )
    model = student(attention)
    with torch.no_grad():
        logits = [
            model(input_ids=b.input_ids, position_ids=b.position_ids).logits
            for b in (collate(s, rows, PAD, row_len=cap) for s in (samples, new))
        ]
    seq_ids = collate(samples, rows, PAD, row_len=cap).seq_ids
    others = (seq_ids >= 0) & (seq_ids != i)  # (1, T)
    assert torch.allclose(logits[0][others], logits[1][others], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[0][seq_ids == i], logits[1][seq_ids == i])


def test_perturbation_test_has_teeth_without_position_ids():
    """Control: one plain causal row (no restart) lets sequence 0 leak into sequence 1."""
    samples, _ = make_case([(3, 2), (2, 2)], seed=0)
    new = [Sample([5, 6, 7], [8, 9]), samples[1]]
    model = student("sdpa")
    with torch.no_grad():
        logits = [
            model(input_ids=collate(s, [[0, 1]], PAD).input_ids).logits for s in (samples, new)
        ]
    assert not torch.allclose(logits[0][0, 5:], logits[1][0, 5:])


# ---------------------------------------------------------------- the kernel choice
def test_for_training_without_a_choice_keeps_the_fixed_kernel_and_restores():
    """The toy world's builder calls ``for_training(model)``: on CPU always sdpa_varlen, never a
    measured kernel, so the cached world does not depend on a timing."""
    model = student("sdpa")
    with attention.for_training(model) as m:
        assert m.config._attn_implementation == attention.VARLEN
    with attention.for_training(model, attention.SDPA) as m:
        assert m.config._attn_implementation == attention.SDPA
    with attention.packed_attention(model, None) as m:  # a role without a choice: unchanged
        assert m.config._attn_implementation == attention.SDPA
    assert model.config._attn_implementation == "sdpa"
