"""Attention for packed rows, and the choice among the exact kernels of a device.

A packed row holds several sequences (``position_ids`` restart at 0 for each, as ``collate``
lays them out) that must not see each other. On CPU two kernels do that exactly:

- ``sdpa``: stock SDPA under the block-diagonal causal mask transformers builds from
  ``position_ids`` (its ``find_packed_sequence_indices``); one call per layer, T² per row.
- ``sdpa_varlen``: causal SDPA on each sequence separately (:func:`sdpa_varlen_attention`);
  Σ L² per row and no mask, but one call per sequence.

Which is faster depends on the machine, the shapes and the thread count, so it is measured,
not assumed: on the toy's rows here ``sdpa`` took 27.6–29.6 ms a learner step against 36.7–52.8
for ``sdpa_varlen`` on 1 thread (14.4–15.9 against 35.8–41.2 on 2), with the same loss.
:func:`select` times the candidates of a device (``KERNELS``) on one shape bucket and caches
the winner; the pipeline picks once per run and records it in the run spec
(``npd_core.pipeline.kernels``). Flex attention has no CPU backward (torch 2.13), so it is no
CPU candidate.

On CUDA the candidates are (each where it is available, :func:`unavailable` says why not):

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

import copy
import hashlib
import inspect
import json
import math
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModel, PretrainedConfig, PreTrainedModel
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


def _need_cuda(why: str) -> str | None:
    return None if torch.cuda.is_available() else f"CUDA only ({why})"


def _torch_varlen_missing() -> str | None:
    if find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
    return _need_cuda("a flash kernel")


def _flex_missing() -> str | None:
    if find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no flex attention"
    return _need_cuda("flex attention has no CPU backward")


def _flash_missing() -> str | None:
    if find_spec("flash_attn") is None:
        return "the flash-attn package is not importable (pip install flash-attn)"
    return _need_cuda("flash-attn's kernels")


# ---------------------------------------------------------------- the candidates
@dataclass(frozen=True)
class Kernel:
    """An exact packed-attention implementation: its transformers name, what it is, and what
    makes the name known to transformers (None: built in)."""

    name: str
    what: str
    register: Callable[[], object] | None = None
    missing: Callable[[], str | None] | None = None  # why it cannot run here; None: it can
    dtypes: tuple[str, ...] | None = None  # the compute dtypes it takes; None: any


# Exact packed-attention kernels per device type, raced by ``select``; on ties the earlier one
# wins. A device type without an entry keeps the model's own attention. Every entry must pass
# the packed == unpacked test (tests/npd_core/method/test_packing.py runs it for each CPU kernel,
# test_cuda_attention.py for each CUDA one, where CUDA exists).
KERNELS: dict[str, list[Kernel]] = {
    "cpu": [
        Kernel(SDPA, "stock SDPA, block-diagonal causal mask built from position_ids"),
        Kernel(VARLEN, "causal SDPA per packed sequence", register_varlen_attention),
    ],
    "cuda": [
        Kernel(
            TORCH_VARLEN,
            "torch.nn.attention.varlen.varlen_attn on cu_seqlens from position_ids",
            register_cuda_attention,
            _torch_varlen_missing,
            HALF,
        ),
        Kernel(
            FLEX_DOC,
            "flex attention (compiled) under a document BlockMask from position_ids",
            register_cuda_attention,
            _flex_missing,
        ),
        Kernel(SDPA, "stock SDPA, block-diagonal causal mask built from position_ids"),
        Kernel(
            FLASH_VARLEN,
            "flash-attn's flash_attn_varlen_func (flash_attention_2) on cu_seqlens",
            register_cuda_attention,
            _flash_missing,
            HALF,
        ),
    ],
}

# The kernel of a role when nothing was chosen: the toy world's builder (its cached weights must
# not depend on a timing) and runs begun before choices were recorded. None = the model's own.
FIXED: dict[str, dict[str, str]] = {"train": {"cpu": VARLEN}, "score": {}}


def kernels(device_type: str, dtype: str | None = None) -> list[str]:
    """Names of the candidates of ``device_type`` that can run here (in ``dtype``, when given),
    each registered with transformers."""
    out = []
    for k in KERNELS.get(device_type, []):
        if (k.missing and k.missing()) or (dtype and k.dtypes and dtype not in k.dtypes):
            continue
        if k.register is not None:
            k.register()
        out.append(k.name)
    return out


def unavailable(device_type: str, dtype: str | None = None) -> dict[str, str]:
    """Why each candidate of ``device_type`` that ``kernels`` leaves out cannot run here."""
    out = {}
    for k in KERNELS.get(device_type, []):
        why = k.missing() if k.missing else None
        if why is None and dtype and k.dtypes and dtype not in k.dtypes:
            why = f"computes in {'/'.join(k.dtypes)} only, not {dtype}"
        if why is not None:
            out[k.name] = why
    return out


def fixed_kernel(role: str, device_type: str) -> str | None:
    """The kernel ``role`` ("train" or "score") uses without a choice; None = the model's own."""
    return FIXED.get(role, {}).get(device_type)


def known(name: str) -> str:
    """``name`` made usable (registered when it is ours); unknown names pass through to
    transformers, which names what it accepts."""
    for ks in KERNELS.values():
        for k in ks:
            if k.name == name and k.register is not None:
                k.register()
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


# ---------------------------------------------------------------- the measurement
PROBE_LAYERS = 2  # decoder layers of the probe: per-layer cost is what differs between kernels
PROBE_VOCAB = 256  # the embedding costs the same under every kernel
PROBE_ROWS = 4  # rows per probe forward: attention cost is linear in rows
TIE = 0.05  # within 5% of the fastest (the probe's noise here), the earlier candidate wins


def bucket_len(n: float) -> int:
    """``n`` to the nearest (by ratio) of 8, 12, 16, 24, 32, 48, … (2^k and 1.5·2^k): one
    measurement serves every length of its bucket, and is taken at the bucket's length."""
    n = max(8.0, float(n))
    k = 2 ** math.floor(math.log2(n))
    grid = [k, k + k // 2, 2 * k]
    return min(grid, key=lambda g: (abs(math.log(g / n)), -g))


@dataclass(frozen=True)
class Shape:
    """What the fastest kernel depends on besides the model: a shape bucket."""

    backward: bool  # training (forward + backward) or scoring (forward only)
    rows: int  # rows per forward (probed with at most PROBE_ROWS)
    row_len: int  # tokens per row, bucketed
    seq_len: int  # typical packed sequence length, bucketed, <= row_len
    threads: int  # torch intra-op threads of the stage
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def bucket(
        cls,
        *,
        backward: bool,
        rows: int,
        row_len: int,
        seq_len: float,
        threads: int,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> Shape:
        """The bucket of a stage's shapes (lengths rounded up by :func:`bucket_len`)."""
        row = bucket_len(row_len)
        return cls(
            backward,
            max(1, min(rows, PROBE_ROWS)),
            row,
            min(row, bucket_len(seq_len)),
            max(1, threads),
            device,
            dtype,
        )


@dataclass
class Choice:
    """The kernel picked for one bucket, and why: ``measured``, ``cached`` (an earlier
    measurement of the bucket), ``only`` (one candidate) or ``none`` (no candidates: the
    model's own). ``seconds``: median seconds a probe step per candidate."""

    kernel: str | None
    source: str
    key: str
    seconds: dict[str, float] = field(default_factory=dict)


_CHOICES: dict[str, Choice] = {}  # this process's measurements, by bucket key


def bucket_key(config: PretrainedConfig, shape: Shape) -> str:
    """The cache key of a bucket: the model's architecture (not its weights or path), the
    shape, and what else moves timings (torch version, machine, core count)."""
    cfg = config.to_dict()
    drop = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache")
    arch = {k: v for k, v in cfg.items() if k not in drop and not k.startswith("_attn")}
    blob = json.dumps(
        [arch, asdict(shape), torch.__version__, platform.machine(), os.cpu_count()],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def probe_model(config: PretrainedConfig, shape: Shape, seed: int = 0) -> PreTrainedModel:
    """The model's decoder cut to ``PROBE_LAYERS`` layers and a ``PROBE_VOCAB`` vocabulary,
    random weights: its attention has the real heads, widths and kernels at a fraction of the
    cost (no LM head: the same under every kernel)."""
    d = copy.deepcopy(config.to_dict())
    n = min(int(d.get("num_hidden_layers") or 1), PROBE_LAYERS)
    d.update(num_hidden_layers=n, vocab_size=min(int(d.get("vocab_size") or 1), PROBE_VOCAB))
    d["use_cache"] = False
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][:n]
    if d.get("pad_token_id") is not None and d["pad_token_id"] >= d["vocab_size"]:
        d["pad_token_id"] = 0
    cfg = type(config).from_dict(d)
    cfg._attn_implementation = SDPA
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg).to(getattr(torch, shape.dtype)).to(shape.device)
    return model.train(shape.backward)


def probe_rows(shape: Shape, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids), both (rows, row_len): rows packed with sequences of length
    uniform in [seq_len/2, 3·seq_len/2], the last one of a row cut at its end."""
    rng = random.Random(seed)
    lo, hi = max(1, shape.seq_len // 2), max(1, 3 * shape.seq_len // 2)
    pos = torch.zeros(shape.rows, shape.row_len, dtype=torch.long)
    for b in range(shape.rows):
        t = 0
        while t < shape.row_len:
            n = min(rng.randint(lo, hi), shape.row_len - t)
            pos[b, t : t + n] = torch.arange(n)
            t += n
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (shape.rows, shape.row_len), generator=g)
    return ids.to(shape.device), pos.to(shape.device)


def _probe_step(
    model: PreTrainedModel, ids: torch.Tensor, pos: torch.Tensor, backward: bool
) -> float:
    """One probe step, timed to the end of its kernels."""
    t0 = time.perf_counter()
    if backward:
        out = model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, use_cache=False)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(
    config: PretrainedConfig, shape: Shape, names: list[str], reps: int = 5, seed: int = 0
) -> dict[str, float]:
    """Median seconds of a probe step (:func:`probe_model` on :func:`probe_rows`) per kernel;
    one untimed warm-up each, then candidates interleaved step by step so that background
    load hits all alike. Runs on ``shape.threads`` threads (restored afterwards). A kernel whose
    warm-up raises (a flash kernel on a GPU older than it supports, a compile that fails) takes
    ``inf``: it loses the race instead of failing the run."""
    before = torch.get_num_threads()
    torch.set_num_threads(shape.threads)
    try:
        model = probe_model(config, shape, seed)
        ids, pos = probe_rows(shape, model.config.vocab_size, seed)
        times: dict[str, list[float]] = {n: [] for n in names}
        failed: set[str] = set()
        for i in range(reps + 1):
            for name in names if i % 2 == 0 else names[::-1]:
                if name in failed:
                    continue
                model.set_attn_implementation(known(name))
                try:
                    dt = _probe_step(model, ids, pos, shape.backward)
                except Exception:  # noqa: BLE001 - on the untimed warm-up only (below)
                    if i:
                        raise
                    failed.add(name)
                    model.zero_grad(set_to_none=True)
                    continue
                if i:
                    times[name].append(dt)
        return {n: math.inf if n in failed else statistics.median(t) for n, t in times.items()}
    finally:
        torch.set_num_threads(before)


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a torn or foreign file: measure again


def _write_cache(path: Path, key: str, choice: Choice, shape: Shape) -> None:
    """Add one bucket to the cache file (read, merge, temp + rename: a reader never sees half)."""
    data = _read_cache(path)
    data[key] = {"kernel": choice.kernel, "seconds": choice.seconds, "shape": asdict(shape)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def select(
    config: PretrainedConfig,
    shape: Shape,
    *,
    cache: Path | None = None,
    reps: int = 7,
    measure_fn: Callable[..., dict[str, float]] = measure,
) -> Choice:
    """The fastest exact kernel of ``shape.device`` for a model of ``config`` on ``shape``:
    measured once per bucket (this process remembers it; ``cache``, a JSON file, keeps it
    across processes). The fastest median wins, except that a candidate listed earlier in
    ``KERNELS`` (stock SDPA before our own code) wins within ``TIE`` of it."""
    names = kernels(shape.device, shape.dtype)
    key = bucket_key(config, shape)
    if not names:
        return Choice(None, "none", key)
    if len(names) == 1:
        return Choice(names[0], "only", key)
    if key in _CHOICES:
        return replace(_CHOICES[key], source="cached")
    hit = _read_cache(cache).get(key)
    if hit and hit.get("kernel") in names:
        _CHOICES[key] = Choice(hit["kernel"], "measured", key, hit.get("seconds", {}))
        return replace(_CHOICES[key], source="cached")
    seconds = measure_fn(config, shape, names, reps=reps)
    best = min(seconds.values())
    kernel = next(n for n in names if seconds[n] <= (1 + TIE) * best)
    choice = Choice(kernel, "measured", key, seconds)
    _CHOICES[key] = choice
    if cache is not None:
        _write_cache(cache, key, choice, shape)
    return choice
