"""IFD and Δ-IFD: a hand-computed example and a model whose logits are known by construction."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from npd_core.method.ifd import delta_ifd, log_ifd
from npd_core.method.score import score


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
    s = score(model, prompts, responses, start_id=start, top_k=3, batch_tokens=64, bf16=False)
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
