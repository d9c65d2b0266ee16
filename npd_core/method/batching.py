"""Batch sizes from a memory budget, and batches that halve when the GPU runs out of memory.

A fixed count of sequences that suits a toy model overflows an 8 B one: a decoding row holds the
KV cache of its prompt and every new token, ``layers × kv heads × head dim × 2 (K and V) ×
bytes`` per token (12 KiB for Qwen2.5-0.5B in bf16, 0.5 MiB for a 70 B model). So generation,
scoring and evaluation take as many rows as their stage's memory budget holds, at most their
count (``generate.batch_size``, ``eval.batch_size``, ``score.batch_tokens``): on CPU the budget
is unbounded unless set (``memory_gb: auto``), so the toy worlds batch as they always did.

The budget is an estimate; on CUDA an ``OutOfMemoryError`` in a batch halves it and runs the
same rows again (logged), down to one row, then fails in one line naming the stage and the
memory that row needs. Per-sample seeds (``npd_core.seeds``) make a sample independent of the
batch it decodes in, so the halving changes no sample.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from npd_core.errors import NPDError

AUTO_FRACTION = 0.8  # memory_gb: auto = this share of the device memory free at the stage's start
LOGIT_COPIES = 4  # float32 (rows, V) tensors of a decoding step: logits, log-softmax, scaled, noise
GIB = 2**30

T = TypeVar("T")


class OutOfMemory(NPDError):
    """A stage ran out of device memory with a batch of one row."""


def memory_budget(setting: float | str | None, dev: torch.device) -> int | None:
    """A stage's ``memory_gb`` in bytes: a number is GiB on any device; ``auto`` is
    ``AUTO_FRACTION`` of the CUDA memory free now (call it after the model is loaded) and no
    bound on CPU (the stage's count alone decides, as before budgets existed); None: no bound."""
    if setting is None or (setting == "auto" and dev.type != "cuda"):
        return None
    if setting == "auto":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(AUTO_FRACTION * free)
    return int(float(setting) * GIB)


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if get else config


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """KV-cache bytes of one token: layers × kv heads × head dim × 2 (K and V) × ``dtype_bytes``."""
    c = _text_config(config)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers * kv * head_dim * 2 * dtype_bytes


def forward_bytes_per_token(config: Any, dtype_bytes: int, row_len: int) -> int:
    """Activation bytes of one token in a forward without cache or gradients (scoring): one
    layer's live tensors at a time, the residual stream, the normalised input, q, k, v and the
    MLP's gate, up and product (4 H + 2 kv·d + 3 I values), plus ``row_len`` bytes of the packed
    rows' block-diagonal attention mask. An estimate; an out-of-memory error still halves."""
    c = _text_config(config)
    per_layer_kv = kv_bytes_per_token(c, dtype_bytes) // c.num_hidden_layers
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    return (4 * c.hidden_size + 3 * inter) * dtype_bytes + per_layer_kv + row_len


def activation_bytes(model: torch.nn.Module, bf16: bool) -> int:
    """Bytes of one cached or activation value: 2 under bf16 autocast, else the weights'."""
    return 2 if bf16 else next(model.parameters()).element_size()


def decode_row_bytes(model: torch.nn.Module, tokens: int, bf16: bool) -> int:
    """Memory of one decoding row of ``tokens`` (prompt, padding and new tokens): its KV cache
    plus its share of a step's float32 logits and their same-sized temporaries."""
    kv = kv_bytes_per_token(model.config, activation_bytes(model, bf16))
    vocab = _text_config(model.config).vocab_size
    return tokens * kv + LOGIT_COPIES * 4 * vocab


def rows_that_fit(budget: int | None, cap: int, row_bytes: Callable[[int], int]) -> int:
    """The most rows ``n ≤ cap`` with ``n × row_bytes(n) ≤ budget`` (``row_bytes(n)``: the cost
    of each of the first n rows, non-decreasing in n, e.g. rows sorted by length and padded to
    the longest); at least 1; ``cap`` when there is no budget."""
    if budget is None:
        return cap
    lo, hi = 1, cap  # row 1 always runs: the out-of-memory path says what it needs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid * row_bytes(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _device_memory() -> str:
    if not torch.cuda.is_available():
        return ""
    free, total = torch.cuda.mem_get_info()
    return f"; the GPU has {free / GIB:.2f} GiB free of {total / GIB:.2f}"


def halving(
    stage: str,
    n: int,
    fit: Callable[[int, int], int],
    run: Callable[[int, int], T],
    need: Callable[[int], int],
    *,
    unit: str = "sequence",
    halve: bool = True,
    log: Callable[[str], None] = _stderr,
) -> Iterator[tuple[int, int, T]]:
    """Run units ``[0, n)`` in batches: ``fit(start, cap)`` says how many units from ``start``
    the next batch takes (≤ cap, ≥ 1; cap starts unbounded), ``run(start, end)`` runs them; yields
    ``(start, end, result)``. A ``torch.OutOfMemoryError`` in ``run`` halves the cap and runs
    the same units again (one ``log`` line each time), for the rest of the stage too; at one
    ``unit`` it raises :class:`OutOfMemory` with ``need(start)``, that unit's bytes. ``halve``
    False: the error propagates (a benchmark that times one batch size must not time another)."""
    start, cap = 0, n
    while start < n:
        size = max(1, min(fit(start, cap), n - start))
        try:
            result = run(start, start + size)
        except torch.OutOfMemoryError:
            if not halve:
                raise
            result = None
            failed = True  # handled below, once the error and its frames are released
        else:
            failed = False
        if failed:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size == 1:
                raise OutOfMemory(
                    f"{stage}: out of device memory with a batch of one {unit}, which needs "
                    f"about {need(start) / GIB:.2f} GiB beyond the weights{_device_memory()}; "
                    "free the GPU of other work, shorten the prompts or max_new_tokens, or use "
                    "a smaller model"
                )
            cap = size // 2
            log(f"{stage}: out of device memory at a batch of {size}; retrying at {cap}")
            continue
        yield start, start + size, result
        start += size
