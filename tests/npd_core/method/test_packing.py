"""Packing: the packer's invariants, and packed == padded (loss and gradients).

The exactness test runs a tiny random Qwen2 student (float32, tiny_qwen.py) on a packed batch
(``position_ids`` only: transformers builds the block-diagonal causal mask) and on the same
samples padded one per row under the standard 2D ``attention_mask``, through the trainer's own
``per_token_loss`` and ``token_mean``. That no sequence of a packed row sees another is
test_attention.py's.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_qwen import ATTENTIONS, FAST, PAD, make_case, student

from npd_core.bench import packing as bench_packing
from npd_core.config import TrainConfig
from npd_core.method.losses import token_mean
from npd_core.method.packing import (
    IGNORE_INDEX,
    Sample,
    best_fit_decreasing,
    collate,
    fill_ratio,
    fit_lengths,
    greedy_stream,
    pack,
)
from npd_core.method.train import per_token_loss

LOSSES = {
    "forward_kl": TrainConfig(loss="forward_kl"),
    "ce": TrainConfig(loss="ce"),
    "sft_mix": TrainConfig(loss="forward_kl", sft_weight=0.5),
}


# ---------------------------------------------------------------- packer
lengths_st = st.lists(st.integers(1, 40), min_size=0, max_size=60)


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, extra=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_bfd_fits_capacity_keeps_every_item_once_and_is_deterministic(lengths, extra, seed):
    cap = max(lengths, default=1) + extra
    bins = best_fit_decreasing(lengths, cap, seed)
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert bins == best_fit_decreasing(list(lengths), cap, seed)
    # no two rows could be merged (the first item of the later row did not fit the earlier)
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > cap


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, extra=st.integers(0, 40))
def test_greedy_keeps_arrival_order_and_fits_capacity(lengths, extra):
    cap = max(lengths, default=1) + extra
    bins = pack(lengths, cap, mode="greedy")
    assert bins == greedy_stream(lengths, cap)
    assert [i for b in bins for i in b] == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(0 < x <= cap for x in loads)
    assert all(a + lengths[b[0]] > cap for a, b in zip(loads, bins[1:], strict=False))


def test_bfd_fills_rows_of_a_long_tailed_mix_to_at_least_95_percent():
    lens = [p + r for p, r in bench_packing.synthetic_lengths(2000, 60, 400, seed=1)]
    cap = 2 * sorted(lens)[int(0.99 * len(lens))]
    kept = [min(n, cap) for n in lens]
    rows = best_fit_decreasing(kept, cap, seed=0)
    assert sum(kept) / (len(rows) * cap) >= 0.95


def test_packer_rejects_an_item_longer_than_a_row():
    with pytest.raises(ValueError, match="exceeds capacity"):
        best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match="exceeds capacity"):
        greedy_stream([3, 9], 8)


@settings(max_examples=60, deadline=None)
@given(
    pr=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12)), min_size=1, max_size=20),
    cap=st.integers(2, 16),
    policy=st.sampled_from(["truncate", "drop"]),
)
def test_overlong_samples_are_truncated_or_dropped_never_split(pr, cap, policy):
    samples = [Sample(list(range(1, p + 1)), list(range(50, 50 + r))) for p, r in pr]
    kept, index = fit_lengths(samples, cap, policy)
    assert index == sorted(set(index))  # each source sample at most once, in order
    for s, i in zip(kept, index, strict=True):
        src = samples[i]
        assert len(s) <= cap and s.prompt_ids == src.prompt_ids
        assert s.response_ids == src.response_ids[: len(s.response_ids)]
        if len(src) <= cap or policy == "drop":
            assert s == src
    for i, src in enumerate(samples):  # what is missing was overlong and could not be kept
        if i not in index:
            assert len(src) > cap and (policy == "drop" or len(src.prompt_ids) >= cap)
    rows = pack([len(s) for s in kept], cap, seed=3)
    batch = collate(kept, rows, PAD, row_len=cap)
    for b, row in enumerate(rows):  # each kept sample lies whole, contiguous, in one row
        for j, i in enumerate(row):
            at = (batch.seq_ids[b] == i).nonzero().flatten()
            assert at.tolist() == list(range(batch.cu_seqlens[b][j], batch.cu_seqlens[b][j + 1]))
            assert len(at) == len(kept[i])
    assert (batch.seq_ids >= 0).sum() == sum(len(s) for s in kept)


def test_collate_lays_out_the_docstring_example():
    p1, p2, r1, r2, q1, s1, s2 = 11, 12, 13, 14, 15, 16, 17
    batch = collate([Sample([p1, p2], [r1, r2]), Sample([q1], [s1, s2])], [[0, 1]], PAD, 8)
    x = IGNORE_INDEX
    assert batch.input_ids.tolist() == [[p1, p2, r1, r2, q1, s1, s2, PAD]]
    assert batch.labels.tolist() == [[x, r1, r2, x, s1, s2, x, x]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert batch.seq_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1]]
    assert batch.cu_seqlens == [[0, 4, 7]]
    assert (batch.n_loss_tokens, batch.n_real_tokens, fill_ratio(batch)) == (4, 7, 7 / 8)


samples_st = st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=7)


@settings(max_examples=60, deadline=None)
@given(pr=samples_st, extra=st.integers(0, 12), seed=st.integers(0, 99))
def test_collate_positions_restart_labels_mask_prompts_and_targets_align(pr, extra, seed):
    samples = [
        Sample([1 + i] * p, list(range(20 + 10 * i, 20 + 10 * i + r)))
        for i, (p, r) in enumerate(pr)
    ]
    cap = max(p + r for p, r in pr) + extra
    rows = pack([len(s) for s in samples], cap, seed=seed)
    offsets = [0]
    for s in samples[:-1]:
        offsets.append(offsets[-1] + len(s.response_ids))
    batch = collate(samples, rows, PAD, row_len=cap, target_offsets=offsets)
    for b, row in enumerate(rows):
        cu = batch.cu_seqlens[b]
        assert cu == [0, *[sum(len(samples[i]) for i in row[: j + 1]) for j in range(len(row))]]
        for j, i in enumerate(row):
            s, t = samples[i], cu[j]
            n, p = len(s), len(s.prompt_ids)
            assert batch.position_ids[b, t : t + n].tolist() == list(range(n))
            assert batch.input_ids[b, t : t + n].tolist() == s.prompt_ids + s.response_ids
            want = [IGNORE_INDEX] * (p - 1) + s.response_ids + [IGNORE_INDEX]
            assert batch.labels[b, t : t + n].tolist() == want  # prompts and the last: no loss
            idx = batch.target_index[b, t : t + n]
            assert idx[batch.labels[b, t : t + n] != IGNORE_INDEX].tolist() == list(
                range(offsets[i], offsets[i] + len(s.response_ids))
            )
        pad = batch.seq_ids[b] < 0
        assert (batch.labels[b][pad] == IGNORE_INDEX).all()
        assert (batch.input_ids[b][pad] == PAD).all()
        assert batch.position_ids[b][pad].tolist() == list(range(int(pad.sum())))


def test_collate_refuses_an_empty_prompt_instead_of_leaking_its_label():
    with pytest.raises(ValueError, match="empty prompt"):
        collate([Sample([5, 6], [7]), Sample([], [8, 9])], [[0, 1]], PAD, 8)


# ---------------------------------------------------------------- packed == padded
def loss_and_grads(model, batch, targets, cfg, padded: bool):
    model.zero_grad(set_to_none=True)
    if padded:
        out = model(input_ids=batch.input_ids, attention_mask=(batch.seq_ids >= 0).long())
    else:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    loss = token_mean(per_token_loss(out.logits, batch, targets, cfg), batch.n_loss_tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@FAST
@given(pr=samples_st, extra=st.integers(0, 10), seed=st.integers(0, 999))
@example(pr=[(3, 1), (1, 1), (2, 5), (4, 1)], extra=10, seed=1)  # several sequences a row
@example(pr=[(2, 3), (5, 1)], extra=0, seed=2)  # length-1 response, rows of one sequence
@example(pr=[(8, 8)], extra=0, seed=3)  # one full row, no padding
def test_packed_loss_and_gradients_equal_padded(attention, loss_name, pr, extra, seed):
    samples, targets = make_case(pr, seed)
    cap = max(p + r for p, r in pr) + extra
    rows = pack([len(s) for s in samples], cap, seed=seed)
    packed = collate(samples, rows, PAD, row_len=cap, target_offsets=targets.offsets)
    padded = collate(
        samples, [[i] for i in range(len(samples))], PAD, target_offsets=targets.offsets
    )
    assert packed.n_loss_tokens == padded.n_loss_tokens == sum(r for _, r in pr)
    cfg = LOSSES[loss_name]
    got, g_got = loss_and_grads(student(attention), packed, targets, cfg, padded=False)
    want, g_want = loss_and_grads(student("sdpa"), padded, targets, cfg, padded=True)
    assert abs(got - want) <= 1e-5, (got, want)
    for name, g in g_want.items():
        assert (g_got[name] - g).abs().max() <= 1e-5, name
