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
CPU candidate; the GPU issue adds CUDA's kernels to ``KERNELS``.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModel, PretrainedConfig, PreTrainedModel

SDPA = "sdpa"
VARLEN = "sdpa_varlen"


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


# ---------------------------------------------------------------- the candidates
@dataclass(frozen=True)
class Kernel:
    """An exact packed-attention implementation: its transformers name, what it is, and what
    makes the name known to transformers (None: built in)."""

    name: str
    what: str
    register: Callable[[], object] | None = None


# Exact packed-attention kernels per device type, raced by ``select``. A device type without an
# entry keeps the model's own attention. Every entry must pass the packed == unpacked test
# (tests/npd_core/method/test_packing.py runs it for each CPU kernel).
KERNELS: dict[str, list[Kernel]] = {
    "cpu": [
        Kernel(SDPA, "stock SDPA, block-diagonal causal mask built from position_ids"),
        Kernel(VARLEN, "causal SDPA per packed sequence", register_varlen_attention),
    ],
}

# The kernel of a role when nothing was chosen: the toy world's builder (its cached weights must
# not depend on a timing) and runs begun before choices were recorded. None = the model's own.
FIXED: dict[str, dict[str, str]] = {"train": {"cpu": VARLEN}, "score": {}}


def kernels(device_type: str) -> list[str]:
    """Names of the candidates of ``device_type``, each registered with transformers."""
    out = []
    for k in KERNELS.get(device_type, []):
        if k.register is not None:
            k.register()
        out.append(k.name)
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
    load hits all alike. Runs on ``shape.threads`` threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(shape.threads)
    try:
        model = probe_model(config, shape, seed)
        ids, pos = probe_rows(shape, model.config.vocab_size, seed)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(reps + 1):
            for name in names if i % 2 == 0 else names[::-1]:
                model.set_attn_implementation(known(name))
                dt = _probe_step(model, ids, pos, shape.backward)
                if i:
                    times[name].append(dt)
        return {n: statistics.median(t) for n, t in times.items()}
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
    names = kernels(shape.device)
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
