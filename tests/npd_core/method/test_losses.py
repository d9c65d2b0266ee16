"""Losses (STYLE rule 2): identical inputs → 0; limits equal a reference (``F.kl_div``);
fast == plain; exact where the top-k covers the vocabulary, a coarsening (tail bucket) where it
does not; the sampled-token loss's expected gradient is reverse KL's; shapes; an empty batch is 0
and finite."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_qwen import VOCAB, qwen2

from npd_core.method import losses
from npd_core.method.packing import IGNORE_INDEX, Sample, collate
from npd_core.method.score import response_scores

V = 11


def case(n: int = 5, k: int = 4, seed: int = 0, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n, vocab, generator=g)  # (N, V) student logits
    ids = torch.rand(n, vocab, generator=g).argsort(-1)[:, :k]  # (N, k) distinct ids a row
    lp = torch.log_softmax(3 * torch.randn(n, k, generator=g), -1)  # (N, k) teacher top-k
    return z, ids, lp


def full_teacher(ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """A teacher whose top-k is its whole vocabulary (k = V): full log-probs, (N, V)."""
    return torch.empty(ids.shape).scatter_(-1, ids, torch.log_softmax(lp, -1))


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row with ``F.kl_div`` (input = log q, target = log p)."""
    return F.kl_div(q_log, p_log, reduction="none", log_target=True).sum(-1)


seeds = st.integers(0, 10_000)


@settings(max_examples=30, deadline=None)
@given(seed=seeds)
def test_identical_distributions_give_zero(seed):
    z, _, _ = case(k=V, seed=seed)
    ids = torch.arange(V).expand(5, V)
    lp = torch.log_softmax(z, -1)  # teacher == student, k = V
    for out in (
        losses.forward_kl_topk(z, ids, lp),
        losses.reverse_kl(z, ids, lp),
        *(losses.generalized_jsd(z, ids, lp, b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)),
    ):
        assert out.abs().max() <= 1e-5
    # rest-mass variant: teacher = the student's own top-4 log-probs, the rest matches too
    top = lp.topk(4, -1)
    assert losses.forward_kl_topk(z, top.indices, top.values, rest_mass=True).abs().max() <= 1e-5


@settings(max_examples=30, deadline=None)
@given(seed=seeds)
def test_forward_kl_topk_with_k_equal_vocab_is_full_forward_kl(seed):
    z, ids, lp = case(k=V, seed=seed)
    want = kl(full_teacher(ids, lp), torch.log_softmax(z, -1))
    torch.testing.assert_close(losses.forward_kl_topk(z, ids, lp), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, k=st.integers(1, V))
def test_forward_kl_topk_equals_a_plain_loop(seed, k):
    z, ids, lp = case(k=k, seed=seed)
    got = losses.forward_kl_topk(z, ids, lp)
    for t in range(z.shape[0]):
        p = torch.softmax(lp[t], -1)
        logq = torch.log_softmax(z[t], -1)[ids[t]]
        assert abs(float((p * (p.log() - logq)).sum()) - float(got[t])) <= 1e-5
    assert (got >= -1e-6).all()  # Gibbs: the student's mass off the top-k only adds


@settings(max_examples=30, deadline=None)
@given(seed=seeds)
def test_generalized_jsd_limits_are_forward_and_reverse_kl(seed):
    z, ids, lp = case(k=V, seed=seed)
    t, s = full_teacher(ids, lp), torch.log_softmax(z, -1)
    torch.testing.assert_close(
        losses.generalized_jsd(z, ids, lp, 0.0), kl(t, s), atol=1e-5, rtol=1e-5
    )  # β = 0: KL(p_T ‖ p_S)
    torch.testing.assert_close(
        losses.generalized_jsd(z, ids, lp, 1.0), kl(s, t), atol=1e-5, rtol=1e-5
    )  # β = 1: KL(p_S ‖ p_T)
    torch.testing.assert_close(losses.reverse_kl(z, ids, lp), kl(s, t), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, beta=st.floats(0.01, 0.99))
def test_generalized_jsd_equals_its_equation(seed, beta):
    z, ids, lp = case(k=V, seed=seed)
    t, s = full_teacher(ids, lp), torch.log_softmax(z, -1)
    m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
    want = beta * kl(t, m) + (1 - beta) * kl(s, m)
    got = losses.generalized_jsd(z, ids, lp, beta)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got >= -1e-6).all()


def test_teacher_outside_its_topk_gets_a_floor_and_stays_normalized():
    z, ids, lp = case(k=3)
    full = losses._teacher_full_logprobs(V, ids, lp)  # (N, V)
    torch.testing.assert_close(full.logsumexp(-1), torch.zeros(5))
    inside = full.gather(-1, ids)
    outside = full.scatter(-1, ids, float("inf")).min(-1).values
    assert (inside.min(-1).values > outside).all()  # every top-k id beats every other id
    assert torch.isfinite(losses.reverse_kl(z, ids, lp)).all()


def test_hard_ce_is_cross_entropy_of_the_given_ids():
    z, _, _ = case()
    y = torch.tensor([0, 3, 10, 5, 5])
    want = -torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(losses.hard_ce(z, y), want)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_shapes_and_float32_upcast(n):
    z, ids, lp = case(n=n)
    zb = z.bfloat16()
    for out in (
        losses.forward_kl_topk(zb, ids, lp),
        losses.forward_kl_topk(zb, ids, lp, True),
        losses.reverse_kl(zb, ids, lp),
        losses.generalized_jsd(zb, ids, lp, 0.5),
        losses.reverse_kl(zb, ids, lp, True),
        losses.generalized_jsd(zb, ids, lp, 0.5, True),
        losses.sampled_reverse_kl(zb, ids[:, 0], lp[:, 0], lp[:, 1], 2.0),
        losses.hard_ce(zb, ids[:, 0]),
    ):
        assert out.shape == (n,) and out.dtype == torch.float32


def test_token_mean_of_an_empty_batch_is_zero_finite_and_differentiable():
    z = torch.zeros(0, V, requires_grad=True)  # every token masked
    loss = losses.token_mean(losses.forward_kl_topk(z, *case(n=0)[1:]), 0)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_token_mean_divides_by_the_step_token_count_not_the_batch():
    per_tok = torch.tensor([1.0, 2.0, 3.0])
    assert losses.token_mean(per_tok, 6).item() == 1.0
    assert losses.token_mean(per_tok, torch.tensor(3)).item() == 2.0


def jsd(t: torch.Tensor, s: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(β) of full log-prob rows by its equation (β = 0 forward, 1 reverse KL)."""
    if beta in (0.0, 1.0):
        return kl(t, s) if beta == 0 else kl(s, t)
    m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


BETAS = (0.0, 0.3, 0.5, 1.0)


def by_beta(z, ids, lp, beta, rest_mass=False):
    """The library's loss for β: forward KL, JSD or reverse KL."""
    if beta == 0:
        return losses.forward_kl_topk(z, ids, lp, rest_mass)
    if beta == 1:
        return losses.reverse_kl(z, ids, lp, rest_mass)
    return losses.generalized_jsd(z, ids, lp, beta, rest_mass)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, k=st.integers(1, V - 3))
def test_the_tail_bucket_is_the_divergence_of_the_coarsened_distributions(seed, k):
    """rest_mass: each of the teacher's top-k ids a bin, everything else one bin, the same for
    both models; built here by summing full distributions over the bins, for every loss. A
    coarsening never raises a divergence (data processing), so it is at most the full one.
    (The rest is 1 − Σ top-k in float32, so the tails here hold ≥ 1% of the mass.)"""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, V, generator=g)  # student logits
    t = torch.log_softmax(torch.randn(5, V, generator=g), -1)  # the full teacher
    top = t.topk(k, -1)  # what the score stage stores: raw top-k log-probs, best first
    s = torch.log_softmax(z, -1)
    onehot = F.one_hot(top.indices, V).sum(1).bool()  # (N, V) in the top-k

    def bins(logp):  # (N, V) → (N, k + 1): top-k ids in order, then the rest
        rest = torch.where(onehot, float("-inf"), logp).logsumexp(-1, keepdim=True)
        return torch.cat([logp.gather(-1, top.indices), rest], -1)

    for beta in BETAS:
        got = by_beta(z, top.indices, top.values, beta, rest_mass=True)
        torch.testing.assert_close(got, jsd(bins(t), bins(s), beta), atol=1e-5, rtol=1e-4)
        assert (got <= jsd(t, s, beta) + 1e-5).all()


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_with_the_top_k_covering_the_vocabulary_every_loss_is_the_full_divergence(seed):
    """top-k = V (score.top_k ≥ vocabulary): reverse KL and JSD, with or without the tail
    bucket, equal the divergence of the full distributions."""
    z, ids, lp = case(k=V, seed=seed)
    t, s = full_teacher(ids, lp), torch.log_softmax(z, -1)
    for beta in BETAS:
        want = jsd(t, s, beta)
        for rest_mass in (False, True):
            got = by_beta(z, ids, t.gather(-1, ids), beta, rest_mass)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_score_top_k_at_the_vocabulary_gives_exact_divergences_on_a_tiny_model():
    """The score stage's targets at top_k ≥ the vocabulary (capped to it) of a tiny teacher:
    the losses from them equal the divergences of its full log-softmax at every response
    position."""
    teacher = qwen2()
    samples = [Sample([1, 2, 3], [4, 5, 6, 7]), Sample([8, 9], [10, 11, 12])]
    batch = collate(samples, [[0, 1]], pad_id=0)
    sc = response_scores(teacher, batch, top_k=10 * VOCAB, bf16=False)
    assert sc.topk_ids.shape == (7, VOCAB)
    with torch.no_grad():
        t = torch.log_softmax(
            teacher(**{"input_ids": batch.input_ids, "position_ids": batch.position_ids}).logits, -1
        )
    t = t[batch.labels != IGNORE_INDEX]  # (M, V) the teacher at the response positions
    z = 2 * torch.randn(7, VOCAB, generator=torch.Generator().manual_seed(0))  # a student
    s = torch.log_softmax(z, -1)
    for beta in BETAS:
        for rest_mass in (False, True):
            got = by_beta(z, sc.topk_ids, sc.topk_logprobs, beta, rest_mass)
            torch.testing.assert_close(got, jsd(t, s, beta), atol=1e-5, rtol=1e-4)


def test_sampled_reverse_kl_in_expectation_is_reverse_kls_gradient():
    """On the student's own samples (ratio 1), the expected gradient over y ~ p_S of the
    sampled-token loss is the gradient of KL(p_S ‖ p_T) (the score-function identity), and its
    expected value is KL(p_S ‖ p_T) itself."""
    g = torch.Generator().manual_seed(1)
    z = (2 * torch.randn(1, V, generator=g)).requires_grad_()
    t = torch.log_softmax(2 * torch.randn(1, V, generator=g), -1)
    s = torch.log_softmax(z, -1)
    kl(s, t).sum().backward()
    want = z.grad.clone()
    z.grad = None
    p = s.detach().exp()[0]
    expected_value = 0.0
    for y in range(V):
        label = torch.tensor([y])
        out = losses.sampled_reverse_kl(z, label, t[:, y], s.detach()[:, y], clip=2.0)
        (p[y] * out).sum().backward()
        expected_value += float(p[y] * out.detach())
    torch.testing.assert_close(z.grad, want, atol=1e-5, rtol=1e-4)
    assert abs(expected_value - float(kl(s, t).detach())) < 1e-5


def test_sampled_reverse_kl_truncates_the_ratio_and_skips_tokens_without_a_generator():
    """Value −w·A with w = min(p_S/p_gen, clip); gradient −w·A·(onehot − p_S); a NaN generator
    log-prob (a mixed-in sequence) gives 0 and no gradient."""
    z = torch.zeros(3, 4, requires_grad=True)  # p_S = 1/4 everywhere
    labels = torch.tensor([0, 1, 2])
    teacher = torch.log(torch.tensor([0.5, 0.1, 0.9]))
    gen = torch.log(torch.tensor([0.5, 0.05, float("nan")]))  # ratios 0.5, 5 → clip 2, none
    out = losses.sampled_reverse_kl(z, labels, teacher, gen, clip=2.0)
    adv = teacher - math.log(0.25)
    want = torch.stack([-0.5 * adv[0], -2.0 * adv[1], torch.tensor(0.0)])
    torch.testing.assert_close(out, want)
    out.sum().backward()
    onehot = F.one_hot(labels, 4).float()
    grad = (-torch.tensor([0.5, 2.0, 0.0]) * adv)[:, None] * (onehot - 0.25)
    torch.testing.assert_close(z.grad, grad)


def test_sequence_weights_make_every_sequence_count_once():
    seq = torch.tensor([3, 3, 3, 7, 1, 1])
    w = losses.sequence_weights(seq)
    torch.testing.assert_close(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5]))
    per_tok = torch.tensor([3.0, 3.0, 3.0, 1.0, 2.0, 4.0])  # sequence means 3, 1, 3
    assert losses.token_mean(per_tok * w, 3).item() == pytest.approx(7 / 3)
