"""Counter-based sampling noise on top of the seed scheme (``npd_core/seeds.py``).

``uniform_noise(sample_keys, step, token_keys)`` is a pure function of (sample seed, decoding
step, token id), so a sample's tokens do not depend on its batch, the batch order or how a round
is sharded, and the draw stays vectorised.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32), in 16-bit halves so no product
    overflows int64 (wrap-around of signed integers is not something to rely on)."""
    lo = x * (c & 0xFFFF)  # < 2**48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16  # < 2**32
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche ("lowbias32", C. Wellons), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Fold 63-bit sample seeds (B,) int64 into 32-bit keys (B,) int64 for ``uniform_noise``."""
    return _mix32(_mix32(seeds & _M32) ^ ((seeds >> 32) & _M32))


def token_keys(vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-token keys (V,) int64, computed once per generation call."""
    return _mix32(_mix32(torch.arange(vocab, dtype=torch.long, device=device)) ^ 0x9E3779B9)


def uniform_noise(keys: torch.Tensor, step: int, tokens: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), shape (B, V) float32: a pure function of (sample key, step, token).

    ``keys`` from ``sample_keys`` (B,), ``tokens`` from ``token_keys`` (V,). 24 bits per draw,
    centred in their bin, so neither 0 nor 1 occurs (``-log(-log(u))`` stays finite).
    """
    step_key = _mix32(keys ^ _mix32(torch.full_like(keys, (step * 0x9E3779B1) & _M32)))  # (B,)
    bits = _mix32(step_key[:, None] ^ tokens[None, :])  # (B, V)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(keys: torch.Tensor, step: int, tokens: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (B, V): ``argmax(logits / T + g)`` samples ``softmax(logits / T)``."""
    return -torch.log(-torch.log(uniform_noise(keys, step, tokens)))
