"""Losses (STYLE rule 2): identical inputs → 0; limits equal a reference (``F.kl_div``);
fast == plain; shapes; an empty batch is 0 and finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from npd_core.method import losses

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
