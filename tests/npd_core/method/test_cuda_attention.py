"""Packed attention on CUDA (``autotune.KERNELS["cuda"]``): every kernel, packed == unpacked
(loss and gradients within 1e-3 in bf16 under autocast, 1e-5 in fp32, where it computes in
fp32) on a CUDA device, skipped with the reason elsewhere. On any machine: what the CUDA kernels
share (cu_seqlens from position ids, the cast to autocast's dtype, the reshapes) against SDPA
with a block-diagonal mask through a stand-in kernel, each spelling of torch's ``varlen_attn``
through a fake of it, the candidates' availability and reasons, and the CPU list unchanged.
It imports no more than the method needs (no store, no Prefect): ``scripts/device-check`` runs
it on a GPU box that has torch and transformers only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_qwen import PAD, make_case, student

from npd_core.config import TrainConfig
from npd_core.method import attention
from npd_core.method.packing import collate, pack
from npd_core.method.train import step_loss
from npd_core.pipeline import autotune

CUDA = torch.cuda.is_available()
NAMES = [k.name for k in autotune.KERNELS["cuda"]]


def _block_diagonal_sdpa(q, k, v, pos, scale=None):
    """Reference: SDPA under causal ∧ same-sequence (sequences restart at position 0)."""
    T = q.shape[2]
    seg = (pos == 0).cumsum(-1)  # (B, T)
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & torch.ones(T, T).bool().tril()
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    return out.transpose(1, 2)  # (B, T, H, D)


def _per_sequence(q, k, v, cu, scale, causal=True):
    """A stand-in varlen kernel: (B·T, H, D) inputs, causal SDPA per [cu[i], cu[i+1])."""
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        s = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]  # (1, H, L, D)
        out.append(F.scaled_dot_product_attention(*s, is_causal=causal, scale=scale)[0])
    return torch.cat(out, dim=1).transpose(0, 1)  # (B·T, H, D)


POS = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]])  # (B, T)


def _qkv(dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, 16, dtype=dtype)  # (B, H, T, D)
    k, v = torch.randn(2, 2, 8, 16, dtype=dtype), torch.randn(2, 2, 8, 16, dtype=dtype)
    return q, k, v


def test_packed_sequences_start_at_each_row_and_each_position_restart():
    cu, longest = attention.packed_sequences(POS, 2, 8, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 5, 6, 8, 13, 16] and cu.dtype == torch.int32 and longest == 5
    # a row that does not begin at position 0 still starts a sequence; no ids: one per row
    cu, _ = attention.packed_sequences(torch.tensor([[1, 2, 0, 1]]), 1, 4, torch.device("cpu"))
    assert cu.tolist() == [0, 2, 4]
    assert attention.packed_sequences(None, 2, 4, torch.device("cpu"))[0].tolist() == [0, 4, 8]


def test_the_varlen_plumbing_equals_sdpa_with_a_block_diagonal_mask_under_gqa_and_autocast():
    """fp32 q, k beside a bf16 v, as RoPE leaves them under autocast: cast to bf16, flattened,
    run per sequence, shaped back (B, T, H, D)."""
    q, k, v = _qkv()
    want = _block_diagonal_sdpa(*(x.bfloat16() for x in (q, k, v)), POS, scale=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention._varlen(
            "stand-in",
            lambda q, k, v, cu, n, s: _per_sequence(q, k, v, cu, s),
            q,
            k,
            v.bfloat16(),
            0.3,
            POS,
        )
    assert got.dtype == torch.bfloat16 and got.shape == (2, 8, 4, 16)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_the_varlen_kernels_refuse_float32_and_a_kv_cache():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="bfloat16/float16 only"):
        attention.torch_varlen_attention(None, q, k, v, None, position_ids=POS)
    with pytest.raises(ValueError, match="without a KV cache"):
        attention.flash_varlen_attention(None, q[:, :, :1].bfloat16(), k.bfloat16(), v, None)


def _fake_varlen(spelling: str):
    """``varlen_attn`` as each torch spells it, computed per sequence on CPU."""

    def v210(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert k.shape[1] == q.shape[1], "2.10 has no GQA"
        return _per_sequence(q, k, v, cu_q, None, causal=is_causal)

    def v211(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=()):
        assert k.shape[1] == q.shape[1], "2.11 has no GQA"
        return _per_sequence(q, k, v, cu_q, scale, causal=tuple(window_size) == (-1, 0))

    def v212(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(), enable_gqa=False):
        assert enable_gqa == (k.shape[1] != q.shape[1])
        return _per_sequence(q, k, v, cu_q, scale, causal=tuple(window_size) == (-1, 0))

    return {"2.10": v210, "2.11": v211, "2.12": v212}[spelling]


@pytest.mark.parametrize("spelling", ["2.10", "2.11", "2.12"])
def test_torch_varlen_speaks_every_spelling_of_varlen_attn(spelling, monkeypatch):
    """Causal by ``is_causal`` or ``window_size=(-1, 0)``; the scale passed, or folded into q
    where the function takes none; GQA by ``enable_gqa``, or the kv heads repeated."""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen(spelling))
    q, k, v = (x.bfloat16() for x in _qkv())
    scale = None if spelling == "2.10" else 0.3
    want = _block_diagonal_sdpa(q, k, v, POS, scale=scale)
    got, _ = attention.torch_varlen_attention(None, q, k, v, None, scaling=scale, position_ids=POS)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    if spelling == "2.10":  # a scale other than 1/√D folded into q
        want = _block_diagonal_sdpa(q, k, v, POS, scale=0.5)
        got, _ = attention.torch_varlen_attention(
            None, q, k, v, None, scaling=0.5, position_ids=POS
        )
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_cpu_candidates_are_unchanged_and_cuda_ones_say_why_they_cannot_run():
    assert autotune.kernels("cpu") == ["sdpa", "sdpa_varlen"] and autotune.unavailable("cpu") == {}
    assert NAMES == ["torch_varlen", "flex_document", "sdpa", "flash_varlen"]
    half_only = autotune.unavailable("cuda", "float32")
    if not CUDA:
        assert autotune.kernels("cuda") == ["sdpa"]
        assert all(w.startswith("CUDA only") or "flash-attn" in w for w in half_only.values())
    else:
        assert "computes in bfloat16/float16 only" in half_only.get("torch_varlen", "")
    assert "torch_varlen" in half_only and "flash_varlen" in half_only


# ---------------------------------------------------------------- exactness on CUDA
CASES = [
    [(3, 1), (1, 1), (2, 5), (4, 1)],  # several sequences a row
    [(2, 3), (5, 1)],  # length-1 response
    [(6, 9), (4, 4), (3, 12), (8, 2), (5, 5)],
]


def _loss_and_grads(model, batch, targets, padded: bool, bf16: bool):
    """The learner's loss (``step_loss``: fp32 master weights, bf16 autocast when ``bf16``) and
    the gradients of one batch."""
    model.zero_grad(set_to_none=True)
    loss = step_loss(model, batch, targets, TrainConfig(), bf16=bf16, padded=padded)
    loss.backward()
    return float(loss), {n: p.grad.float().cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_kernel_packed_equals_unpacked(name, dtype):
    if not CUDA:
        pytest.skip("no CUDA device here: the CUDA kernels' exactness runs where CUDA exists")
    why = autotune.unavailable("cuda", dtype).get(name)
    if why:
        pytest.skip(f"{name}: {why}")
    tol = 1e-3 if dtype == "bfloat16" else 1e-5
    for pr in CASES:
        samples, targets = make_case(pr, seed=len(pr))
        cap = max(p + r for p, r in pr) + 3
        rows = pack([len(s) for s in samples], cap, seed=0)
        packed = collate(samples, rows, PAD, row_len=cap, target_offsets=targets.offsets)
        padded = collate(
            samples, [[i] for i in range(len(samples))], PAD, target_offsets=targets.offsets
        )
        bf16 = dtype == "bfloat16"
        model = copy.deepcopy(student(attention.known(name))).cuda().train()
        ref = copy.deepcopy(student("sdpa")).cuda().train()
        got, g_got = _loss_and_grads(model, packed, targets, padded=False, bf16=bf16)
        want, g_want = _loss_and_grads(ref, padded, targets, padded=True, bf16=bf16)
        assert abs(got - want) <= tol, (name, pr, float(got), float(want))
        for n, g in g_want.items():
            assert (g_got[n] - g).abs().max() <= tol, (name, pr, n)
