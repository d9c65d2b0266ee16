"""A tiny random Qwen2 student (float32), random Qwen2s of other shapes, and random cases for
them: shared by the tests that run a model on packed rows (test_packing, test_attention,
test_train, test_head, test_bf16_weights)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from transformers import Qwen2Config, Qwen2ForCausalLM

from npd_core.method.packing import Sample
from npd_core.method.train import Targets
from npd_core.pipeline.autotune import kernels

VOCAB, PAD, K = 48, 0, 4
# every exact kernel the CPU choice may pick (autotune.KERNELS), and eager
ATTENTIONS = [*kernels("cpu"), "eager"]
# hypothesis settings of the tests that run the model (each example is a forward or two)
FAST = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=256,
    use_cache=False,
)
_MODELS: dict[str, Qwen2ForCausalLM] = {}


def qwen2(**shape: Any) -> Qwen2ForCausalLM:
    """A random float32 Qwen2 (seed 0, SDPA): the tiny shape above, with ``shape``'s
    Qwen2Config fields over it."""
    torch.manual_seed(0)
    cfg = Qwen2Config(**{**TINY, **shape})
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).float()


def student(attention: str) -> Qwen2ForCausalLM:
    """One tiny random Qwen2 (same weights for every attention implementation), float32."""
    if "base" not in _MODELS:
        _MODELS["base"] = qwen2().eval()  # eval: no dropout anyway
    if attention not in _MODELS:
        _MODELS[attention] = copy.deepcopy(_MODELS["base"])
        _MODELS[attention].set_attn_implementation(attention)
    return _MODELS[attention]


def make_case(pr: list[tuple[int, int]], seed: int) -> tuple[list[Sample], Targets]:
    """Samples of (prompt, response) lengths ``pr`` with random tokens, and random teacher
    top-K targets for their response positions."""
    g = torch.Generator().manual_seed(seed)
    samples = [
        Sample(
            torch.randint(1, VOCAB, (p,), generator=g).tolist(),
            torch.randint(1, VOCAB, (r,), generator=g).tolist(),
        )
        for p, r in pr
    ]
    m = sum(r for _, r in pr)
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(m)])  # (M, K)
    lp = torch.log_softmax(2 * torch.randn(m, K, generator=g), -1).sort(-1, descending=True)
    offsets = torch.tensor([0] + [r for _, r in pr[:-1]]).cumsum(0).tolist()
    return samples, Targets(ids, lp.values, offsets)
