"""Attention for packed rows: the exact kernels of each device and how a model runs with one.

A packed row holds several sequences (``position_ids`` restart at 0 for each, as ``collate``
lays them out) that must not see each other. On CPU two kernels do that exactly:

- ``sdpa``: stock SDPA under the block-diagonal causal mask transformers builds from
  ``position_ids`` (its ``find_packed_sequence_indices``); one call per layer, T² per row.
- ``sdpa_varlen``: causal SDPA on each sequence separately (:func:`sdpa_varlen_attention`);
  Σ L² per row and no mask, but one call per sequence.

Which is faster depends on the machine, the shapes and the thread count, so it is measured,
not assumed: on the toy's rows here ``sdpa`` took 27.6–29.6 ms a learner step against 36.7–52.8
for ``sdpa_varlen`` on 1 thread (14.4–15.9 against 35.8–41.2 on 2), with the same loss.
:func:`npd_core.pipeline.autotune.select` times the candidates of a device (its ``KERNELS``)
on one shape bucket and caches the winner; the pipeline picks once per run and records it in
the run spec (``npd_core.pipeline.kernels``). Flex attention has no CPU backward (torch 2.13),
so it is no CPU candidate.

On CUDA the candidates are (each where it is available, ``autotune.unavailable`` says why not):

- ``torch_varlen``: PyTorch's own variable-length attention (``torch.nn.attention.varlen``,
  torch ≥ 2.10: its flash kernel on ``cu_seqlens`` from ``position_ids``); bf16/fp16 only.
- ``flex_document``: flex attention (compiled by transformers) under a document BlockMask
  (causal ∧ same packed sequence), the mask built uncompiled (transformers' compiled build ran
  past 60 s on an H100 with torch 2.11; flex's own compile takes ~13 s).
- ``sdpa``: stock SDPA with the block-diagonal mask transformers builds from ``position_ids``.
- ``flash_varlen``: flash-attn's ``flash_attn_varlen_func`` (the ``flash_attention_2`` kernel) on
  the same ``cu_seqlens``, when the ``flash-attn`` package is importable; bf16/fp16 only.
  transformers' own ``flash_attention_2`` treats a batch of B > 1 packed rows as unpacked
  (its position-id path needs one row), so npd calls the kernel itself.

Under bf16 autocast RoPE leaves q and k in fp32 and v in bf16 (none of these kernels is on
autocast's lists), so the CUDA kernels cast q, k, v to autocast's dtype first.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

SDPA = "sdpa"
VARLEN = "sdpa_varlen"
TORCH_VARLEN = "torch_varlen"
FLEX_DOC = "flex_document"
FLASH_VARLEN = "flash_varlen"
HALF = ("bfloat16", "float16")  # what the flash kernels compute in


# ---------------------------------------------------------------- attention
def sdpa_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each packed sequence separately (varlen without a flash kernel).

    Sequences are where ``position_ids`` restart at 0, as in ``collate``; a row without
    position ids is one sequence. No KV cache, and a 2D padding mask is never seen
    (transformers builds none for this name), so padding must be on the right. Cost is
    Σ L² instead of the T² of a block-diagonal mask, and no (B, 1, T, T) mask is built.
    Shapes: query (B, H, T, D), key/value (B, Hkv, T, D) → (B, T, H, D).
    """
    B, H, T, D = query.shape
    if key.shape[2] != T:
        raise ValueError(
            "sdpa_varlen is for packed rows without a KV cache (training, scoring); "
            "generate with sdpa"
        )
    gqa = {"enable_gqa": True} if key.shape[1] != H else {}
    starts = set(range(0, B * T, T))  # a sequence never crosses a row
    if position_ids is not None:
        flat_pos = position_ids.expand(B, T).reshape(-1)
        starts.update(torch.nonzero(flat_pos == 0).flatten().tolist())
    bounds = sorted(starts) + [B * T]
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]

    def segments(x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (B, h, T, D) → L_i × (h, L_i, D)
        # one split (its backward is one cat), not B·n slices (each backward a full-size zero fill)
        return x.transpose(0, 1).reshape(x.shape[1], B * T, D).split(lens, dim=1)

    out = [
        F.scaled_dot_product_attention(
            q[None], k[None], v[None], dropout_p=dropout, is_causal=True, scale=scaling, **gqa
        )[0]
        for q, k, v in zip(segments(query), segments(key), segments(value), strict=True)
    ]
    return torch.cat(out, dim=1).view(H, B, T, D).permute(1, 2, 0, 3).contiguous(), None


def register_varlen_attention() -> str:
    """Register ``sdpa_varlen`` with transformers (no mask builder: it needs none)."""
    AttentionInterface.register(VARLEN, sdpa_varlen_attention)
    return VARLEN


# ---------------------------------------------------------------- CUDA kernels
class _Sequences(threading.local):
    """The last ``packed_sequences`` result of this thread (stages run in threads at once)."""

    key: torch.Tensor | None = None
    value: tuple[torch.Tensor, int] | None = None


_SEQUENCES = _Sequences()


def packed_sequences(
    position_ids: torch.Tensor | None, B: int, T: int, dev: torch.device
) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` (int32, (N+1,)) and the longest sequence of B packed rows of T tokens
    flattened to B·T: a sequence starts at each row's start and wherever ``position_ids``
    restart at 0 (as ``collate`` lays rows out; a row's padding is one more sequence). Every
    layer of a forward gets the same ``position_ids`` tensor, so it is computed once a forward
    (one host sync, for the length)."""
    if position_ids is not None and _SEQUENCES.key is position_ids and _SEQUENCES.value:
        return _SEQUENCES.value
    if position_ids is None:
        starts = torch.arange(0, B * T, T, device=dev)
    else:
        first = position_ids.expand(B, T).reshape(-1) == 0  # (B·T,)
        first[::T] = True  # a sequence never crosses a row
        starts = torch.nonzero(first).flatten()
    cu = torch.cat([starts, torch.tensor([B * T], device=dev)]).to(torch.int32)
    out = cu, int((cu[1:] - cu[:-1]).max())
    _SEQUENCES.key, _SEQUENCES.value = position_ids, out
    return out


def compute_dtype(query: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's where it is on, else value's 16-bit dtype,
    else query's (under autocast RoPE returns fp32 q, k beside a bf16 v)."""
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return value.dtype if value.dtype in (torch.float16, torch.bfloat16) else query.dtype


VarlenCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, Any], Any]


def _varlen(
    name: str,
    call: VarlenCall,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Causal attention per packed sequence by a kernel on ``cu_seqlens``: ``call(q, k, v, cu,
    max_len, scaling)`` with q (B·T, H, D), k/v (B·T, Hkv, D) → (B·T, H, D). Shapes as
    ``sdpa_varlen_attention``: query (B, H, T, D), key/value (B, Hkv, T, D) → (B, T, H, D)."""
    B, H, T, D = query.shape
    if key.shape[2] != T:
        raise ValueError(f"{name} is for packed rows without a KV cache; generate with sdpa")
    dt = compute_dtype(query, value)
    if str(dt).removeprefix("torch.") not in HALF:
        raise ValueError(
            f"{name} computes in bfloat16/float16 only, got {dt}: train under bf16 autocast "
            f"(models.bf16) or use {SDPA} or {FLEX_DOC}"
        )
    cu, max_len = packed_sequences(position_ids, B, T, query.device)

    def flat(x: torch.Tensor) -> torch.Tensor:  # (B, h, T, D) → (B·T, h, D)
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D).to(dt)

    out = call(flat(query), flat(key), flat(value), cu, max_len, scaling)  # (B·T, H, D)
    return out.view(B, T, H, D)


def _torch_varlen_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, n: int, scale: Any
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn``, whichever of its spellings this torch has:
    2.10 ``is_causal``, later ``window_size=(-1, 0)``; ``enable_gqa`` where it exists, else
    the kv heads repeated."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)
    if scale is not None:
        if "scale" in params:
            kw["scale"] = scale
        else:
            q = q * (scale * math.sqrt(q.shape[-1]))  # the kernel's own scale is 1/√D
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    return varlen_attn(q, k, v, cu, cu, n, n, **kw)


def _flash_varlen_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, n: int, scale: Any
) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` (GQA native)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True)


def torch_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``torch_varlen``: PyTorch's varlen flash kernel per packed sequence (no dropout; no
    mask is built for this name). Shapes as :func:`sdpa_varlen_attention`."""
    if dropout:
        raise ValueError(f"{TORCH_VARLEN} has no attention dropout; use {SDPA}")
    call = _torch_varlen_call
    return _varlen(TORCH_VARLEN, call, query, key, value, scaling, position_ids), None


def flash_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``flash_varlen``: flash-attn's varlen kernel per packed sequence (dropout ignored, as
    Qwen-style models train without it). Shapes as :func:`sdpa_varlen_attention`."""
    call = _flash_varlen_call
    return _varlen(FLASH_VARLEN, call, query, key, value, scaling, position_ids), None


def flex_document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """``flex_document``: transformers' flex attention (compiled) under the BlockMask of
    :func:`flex_document_mask`, q, k, v cast to one dtype first (:func:`compute_dtype`)."""
    from transformers.integrations.flex_attention import flex_attention_forward

    dt = compute_dtype(query, value)
    q, k, v = query.to(dt), key.to(dt), value.to(dt)
    return flex_attention_forward(module, q, k, v, attention_mask, **kwargs)


def flex_document_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Any:
    """The BlockMask of transformers' mask function for packed rows (causal ∧ same sequence, from
    ``position_ids``), built without compiling it (see the module docstring)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if attention_mask is not None or q_offset or kv_offset:
        raise ValueError(f"{FLEX_DOC} is for packed rows without padding mask or KV cache")
    return create_block_mask(
        mask_function, batch_size, None, q_length, kv_length, device=device, _compile=False
    )


def register_cuda_attention() -> None:
    """Register the CUDA kernels (and flex's mask builder) with transformers (idempotent)."""
    AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)
    AttentionInterface.register(FLASH_VARLEN, flash_varlen_attention)
    AttentionInterface.register(FLEX_DOC, flex_document_attention)
    AttentionMaskInterface.register(FLEX_DOC, flex_document_mask)


# What makes each of our kernels known to transformers (the others are built in).
REGISTER: dict[str, Callable[[], object]] = {
    VARLEN: register_varlen_attention,
    TORCH_VARLEN: register_cuda_attention,
    FLEX_DOC: register_cuda_attention,
    FLASH_VARLEN: register_cuda_attention,
}
# The kernel of a role when nothing was chosen: the toy world's builder (its cached weights must
# not depend on a timing) and runs begun before choices were recorded. None = the model's own.
FIXED: dict[str, dict[str, str]] = {"train": {"cpu": VARLEN}, "score": {}}


def fixed_kernel(role: str, device_type: str) -> str | None:
    """The kernel ``role`` ("train" or "score") uses without a choice; None = the model's own."""
    return FIXED.get(role, {}).get(device_type)


def known(name: str) -> str:
    """``name`` made usable (registered when it is ours); unknown names pass through to
    transformers, which names what it accepts."""
    register = REGISTER.get(name)
    if register is not None:
        register()
    return name


@contextmanager
def packed_attention(model: PreTrainedModel, name: str | None) -> Iterator[PreTrainedModel]:
    """Run ``model`` with attention ``name`` (None: leave it), then restore the previous one
    (generation with a KV cache needs it back)."""
    before = model.config._attn_implementation
    if name is not None and name != before:
        model.set_attn_implementation(known(name))
    try:
        yield model
    finally:
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


@contextmanager
def for_training(model: PreTrainedModel, name: str | None = None) -> Iterator[PreTrainedModel]:
    """The learner's packed attention: ``name`` (the run's recorded choice), else the fixed one
    of the model's device (``FIXED``: sdpa_varlen on CPU, the model's own elsewhere)."""
    with packed_attention(model, name or fixed_kernel("train", model.device.type)) as m:
        yield m
