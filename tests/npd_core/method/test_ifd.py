"""IFD and Δ-IFD: a hand-computed example and a model whose logits are known by construction."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from npd_core.method.ifd import conditional, delta_ifd, log_ifd, ratio_ifd, teacher_nll
from npd_core.method.score import TopK, score


def test_log_ifd_hand_computed():
    # response of 2 tokens: log p(y|x) = [-0.5, -1.0], log p(y) = [-2.0, -1.5]
    # mean NLL(y|x) = 0.75, mean NLL(y) = 1.75 → log IFD = 0.75 − 1.75 = −1.0
    got = log_ifd(np.array([-1.5]), np.array([-3.5]), np.array([2]))
    assert got[0] == -1.0
    assert math.isclose(math.exp(got[0]), (math.exp(0.75)) / math.exp(1.75))
    assert delta_ifd(np.array([0.25]), np.array([-1.0]))[0] == 1.25


def test_empty_response_is_nan():
    assert np.isnan(log_ifd(np.array([0.0]), np.array([0.0]), np.array([0])))[0]


class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: the next-token distribution depends on one token only."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(vocab_size=table.shape[0])

    def forward(self, input_ids, position_ids=None, use_cache=False, **_):
        return SimpleNamespace(logits=self.table[input_ids])


def test_score_matches_known_logits():
    g = torch.Generator().manual_seed(0)
    V, start = 7, 0
    model = Bigram(torch.randn(V, V, generator=g))
    logp = torch.log_softmax(model.table.detach(), -1)
    prompts = [[3, 4, 5], [2], [6, 1]]
    responses = [[1, 2], [5, 5, 6], [3]]
    s = score(model, prompts, responses, view=[start], top_k=3, batch_tokens=64, bf16=False)
    for i, (p, y) in enumerate(zip(prompts, responses, strict=True)):
        cond = sum(logp[a, b] for a, b in zip([p[-1]] + y[:-1], y, strict=True))
        resp = sum(logp[a, b] for a, b in zip([start] + y[:-1], y, strict=True))
        assert math.isclose(s.cond_logprob_sum[i], float(cond), abs_tol=1e-5)
        assert math.isclose(s.resp_logprob_sum[i], float(resp), abs_tol=1e-5)
        # bigram: only the first response token's context differs between the two views
        expected = (float(logp[start, y[0]]) - float(logp[p[-1], y[0]])) / len(y)
        got = log_ifd(
            s.cond_logprob_sum[i : i + 1], s.resp_logprob_sum[i : i + 1], np.array([len(y)])
        )
        assert math.isclose(got[0], expected, abs_tol=1e-5)
        # top-k targets at each response position come from the conditional context
        ctx = [p[-1]] + y[:-1]
        want = logp[ctx].topk(3, -1)
        np.testing.assert_array_equal(s.topk_ids[i], want.indices.numpy())
        np.testing.assert_allclose(s.topk_logprobs[i], want.values.numpy(), atol=1e-6)


def test_scoring_without_the_view_changes_no_conditional_number():
    """Skipping the prompt-less view (filter rule none) leaves top-k and the conditional sums
    bitwise equal: the conditional rows are packed and run the same either way."""
    g = torch.Generator().manual_seed(1)
    model = Bigram(torch.randn(11, 11, generator=g))
    gen = np.random.default_rng(0)
    prompts = [gen.integers(1, 11, gen.integers(1, 6)).tolist() for _ in range(40)]
    responses = [gen.integers(1, 11, gen.integers(1, 9)).tolist() for _ in range(40)]
    kw = dict(top_k=4, batch_tokens=48, bf16=False)
    both = score(model, prompts, responses, view=[0, 3], **kw)
    cond = score(model, prompts, responses, view=None, **kw)
    assert cond.resp_logprob_sum is None and both.resp_logprob_sum is not None
    assert np.array_equal(both.cond_logprob_sum, cond.cond_logprob_sum)
    for a, b in zip(
        both.topk_ids + both.topk_logprobs, cond.topk_ids + cond.topk_logprobs, strict=True
    ):
        assert np.array_equal(a, b)


def test_multi_token_view_and_kl_to_targets():
    """A view of several tokens conditions the first response token on its last token; with
    targets, the per-sample forward KL is Σ_t Σ_k p_T (log p_T − log p_S) over the top-k."""
    g = torch.Generator().manual_seed(2)
    model = Bigram(torch.randn(9, 9, generator=g))
    logp = torch.log_softmax(model.table.detach(), -1)
    prompts, responses = [[1, 2], [4]], [[3, 5, 6], [7]]
    ids = [np.array([[0, 1], [2, 3], [4, 5]]), np.array([[8, 7]])]
    lps = [np.log(np.array([[0.7, 0.2], [0.5, 0.5], [0.9, 0.05]])), np.log([[0.6, 0.3]])]
    s = score(
        model, prompts, responses, view=[8, 2], top_k=None, batch_tokens=64, bf16=False,
        targets=TopK(ids, lps),
    )  # fmt: skip
    for i, (p, y) in enumerate(zip(prompts, responses, strict=True)):
        resp = sum(logp[a, b] for a, b in zip([2] + y[:-1], y, strict=True))
        assert math.isclose(s.resp_logprob_sum[i], float(resp), abs_tol=1e-5)
        kl = 0.0
        for t, ctx in enumerate([p[-1]] + y[:-1]):
            p_t = np.exp(lps[i][t]) / np.exp(lps[i][t]).sum()  # renormalized over the top-k
            kl += float((p_t * (np.log(p_t) - logp[ctx, ids[i][t]].numpy())).sum())
        assert math.isclose(s.forward_kl_sum[i], kl, abs_tol=1e-5)
    assert s.topk_ids is None


def test_cherry_ratio_conditional_and_teacher_nll_hand_computed():
    # the response above: mean NLL(y|x) = 0.75, mean NLL(y) = 1.75 → Cherry's IFD = 0.75 / 1.75
    got = ratio_ifd(np.array([-1.5]), np.array([-3.5]), np.array([2]))
    assert math.isclose(got[0], 0.75 / 1.75)
    assert np.isnan(ratio_ifd(np.array([0.0]), np.array([0.0]), np.array([0])))[0]
    # teacher Σ = −4, generator Σ = −1 over 2 tokens: L_c^T − L_c^S = 2 − 0.5
    assert conditional(np.array([-4.0]), np.array([-1.0]), np.array([2]))[0] == 1.5
    assert teacher_nll(np.array([-4.0]), np.array([2]))[0] == 2.0
