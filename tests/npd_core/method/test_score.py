"""Scoring's per-token log-probs: the log-prob of each response token under the model given its
prompt, what the sampled-token loss reads as the teacher's log p_T(y_t)."""

from __future__ import annotations

import numpy as np
import torch
from tiny_qwen import qwen2

from npd_core.method.score import score


def test_token_logprobs_are_the_models_log_prob_of_each_response_token():
    model = qwen2()
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11]]
    s = score(model, prompts, responses, view=None, top_k=4, batch_tokens=64, bf16=False)
    for p, r, got, total in zip(
        prompts, responses, s.token_logprobs, s.cond_logprob_sum, strict=True
    ):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0], -1)  # (T, V)
        want = logp[len(p) - 1 : -1].gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
        assert got.shape == (len(r),) and abs(float(got.sum()) - total) < 1e-4
