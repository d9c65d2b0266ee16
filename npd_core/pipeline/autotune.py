"""The choice among the exact packed-attention kernels of a device: the candidates
(``KERNELS``), a probe that races them on one shape bucket, and the cache of its winners.

:func:`select` times the candidates of ``shape.device`` on a 2-layer probe of the model
(``measure``), once per bucket: this process remembers it and ``<out>/kernels.json`` keeps it
for later runs in the same output directory. The pipeline picks once per run and records the
choice in the run spec (``npd_core.pipeline.kernels``); the kernels themselves are in
``npd_core.method.attention``. :func:`race` is the one interleaved timing race of npd: the probe
and the packing bench's kernel and learner timings run through it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from npd_core.atomic import atomic_file
from npd_core.method.attention import (
    FLASH_VARLEN,
    FLEX_DOC,
    HALF,
    SDPA,
    TORCH_VARLEN,
    VARLEN,
    known,
)


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
    """An exact packed-attention implementation: its transformers name (registered by
    ``attention.known``), what it is, what stops it here and the dtypes it computes in."""

    name: str
    what: str
    missing: Callable[[], str | None] | None = None  # why it cannot run here; None: it can
    dtypes: tuple[str, ...] | None = None  # the compute dtypes it takes; None: any


# Exact packed-attention kernels per device type, raced by ``select``; on ties the earlier one
# wins. A device type without an entry keeps the model's own attention. Every entry must pass
# the packed == unpacked test (tests/npd_core/method/test_packing.py runs it for each CPU kernel,
# test_cuda_attention.py for each CUDA one, where CUDA exists).
KERNELS: dict[str, list[Kernel]] = {
    "cpu": [
        Kernel(SDPA, "stock SDPA, block-diagonal causal mask built from position_ids"),
        Kernel(VARLEN, "causal SDPA per packed sequence"),
    ],
    "cuda": [
        Kernel(
            TORCH_VARLEN,
            "torch.nn.attention.varlen.varlen_attn on cu_seqlens from position_ids",
            _torch_varlen_missing,
            HALF,
        ),
        Kernel(
            FLEX_DOC,
            "flex attention (compiled) under a document BlockMask from position_ids",
            _flex_missing,
        ),
        Kernel(SDPA, "stock SDPA, block-diagonal causal mask built from position_ids"),
        Kernel(
            FLASH_VARLEN,
            "flash-attn's flash_attn_varlen_func (flash_attention_2) on cu_seqlens",
            _flash_missing,
            HALF,
        ),
    ],
}


def kernels(device_type: str, dtype: str | None = None) -> list[str]:
    """Names of the candidates of ``device_type`` that can run here (in ``dtype``, when given),
    each registered with transformers."""
    out = []
    for k in KERNELS.get(device_type, []):
        if (k.missing and k.missing()) or (dtype and k.dtypes and dtype not in k.dtypes):
            continue
        out.append(known(k.name))
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

    @classmethod
    def learner(
        cls, *, rows: int, row_len: int, seq_len: float, threads: int, device: str, bf16: bool
    ) -> Shape:
        """The learner's bucket (forward and backward): on CUDA under bf16 autocast when
        ``bf16`` (the flash kernels need 16 bits), float32 elsewhere."""
        return cls.bucket(
            backward=True,
            rows=rows,
            row_len=row_len,
            seq_len=seq_len,
            threads=threads,
            device=device,
            dtype="bfloat16" if device == "cuda" and bf16 else "float32",
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


def race(steps: dict[str, Callable[[int], float]], reps: int) -> dict[str, list[float]]:
    """Seconds of each candidate's step over ``reps`` timed rounds, after one untimed warm-up
    round (round 0): the candidates take turns, in reversed order every other round, so that
    background load hits all alike. ``steps[name](i)`` runs round ``i`` and returns its
    seconds. A candidate whose warm-up raises (a flash kernel on a GPU older than it supports,
    a compile that fails) is left out of the result: it loses instead of failing the race; a
    later error raises."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps + 1):
        for name in names if i % 2 == 0 else names[::-1]:
            if name not in times:
                continue
            try:
                dt = steps[name](i)
            except Exception:  # noqa: BLE001 - on the untimed warm-up only (below)
                if i:
                    raise
                del times[name]
                continue
            if i:
                times[name].append(dt)
    return times


def measure(
    config: PretrainedConfig, shape: Shape, names: list[str], reps: int = 5, seed: int = 0
) -> dict[str, float]:
    """Median seconds of a probe step (:func:`probe_model` on :func:`probe_rows`) per kernel,
    raced (:func:`race`). Runs on ``shape.threads`` threads (restored afterwards). A kernel
    whose warm-up raises takes ``inf``."""
    before = torch.get_num_threads()
    torch.set_num_threads(shape.threads)
    try:
        model = probe_model(config, shape, seed)
        ids, pos = probe_rows(shape, model.config.vocab_size, seed)

        def step(name: str) -> Callable[[int], float]:
            def run(i: int) -> float:
                model.set_attn_implementation(known(name))
                try:
                    return _probe_step(model, ids, pos, shape.backward)
                except Exception:
                    model.zero_grad(set_to_none=True)
                    raise

            return run

        times = race({n: step(n) for n in names}, reps)
        return {n: statistics.median(times[n]) if n in times else math.inf for n in names}
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
    """Add one bucket to the cache file (read, merge, write whole: a reader never sees half)."""
    data = _read_cache(path)
    data[key] = {"kernel": choice.kernel, "seconds": choice.seconds, "shape": asdict(shape)}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


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
