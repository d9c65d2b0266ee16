"""The packing bench's workload: a long-tailed length mix (synthetic or read from a file),
random samples and teacher top-k targets for it, the padded baseline's length-grouped batches,
the student it trains (a random Qwen2 of a named size, or an HF checkpoint) and its step in
either layout (packed or padded). The GPU bench (``bench/gpu.py``) draws its rows from the
same mix."""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from npd_core.errors import ConfigError
from npd_core.method.attention import known
from npd_core.method.packing import PackedBatch, Sample
from npd_core.method.train import StepSpec, Targets, optimizer_step, step_loss

# Qwen2-style students; head size 64 everywhere (what flash/vLLM kernels accept).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
    ),  # ~0.2 M
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),  # ~5 M
    "100m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
    ),  # ~100 M
}
# Dense bf16 peak FLOP/s by device-name substring (first match wins).
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
]


# ---------------------------------------------------------------- data
def synthetic_lengths(
    n: int, median: float = 60.0, p99: float = 400.0, seed: int = 0
) -> list[tuple[int, int]]:
    """``n`` (prompt, response) lengths: total log-normal with the given median and p99,
    prompt share uniform in [0.15, 0.5]; both parts at least 1 token."""
    if not 2 <= median < p99:
        raise ConfigError(f"median {median} / p99 {p99}: need 2 <= median < p99")
    rng = random.Random(seed)
    sigma = math.log(p99 / median) / 2.3263  # z of the 99th percentile
    out = []
    for _ in range(n):
        total = max(2, round(math.exp(rng.gauss(math.log(median), sigma))))
        prompt = min(total - 1, max(1, round(total * rng.uniform(0.15, 0.5))))
        out.append((prompt, total - prompt))
    return out


def read_lengths(path: str | Path) -> list[tuple[int, int]]:
    """Lengths from a file: JSON list of [prompt, response] pairs, or one ``p r`` pair a line."""
    text = Path(path).read_text()
    try:
        pairs = json.loads(text)
    except json.JSONDecodeError:
        pairs = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    try:
        out = [(int(p), int(r)) for p, r in pairs]
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected [prompt, response] length pairs") from None
    if not out or min(min(p, r) for p, r in out) < 1:
        raise ConfigError(f"{path}: need at least one pair, every length >= 1")
    return out


def make_data(
    lengths: list[tuple[int, int]], vocab: int, k: int, seed: int
) -> tuple[list[Sample], Targets]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for p, r in lengths:
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        samples.append(Sample(ids[:p], ids[p:]))
    return samples, targets_for(samples, vocab, k, seed)


def targets_for(samples: list[Sample], vocab: int, k: int, seed: int) -> Targets:
    g = torch.Generator().manual_seed(seed + 1)
    offsets, m = [], 0
    for s in samples:
        offsets.append(m)
        m += len(s.response_ids)
    ids = torch.randint(0, vocab, (m, k), generator=g)  # (M, k)
    lp = torch.log_softmax(2 * torch.randn(m, k, generator=g), -1).sort(-1, descending=True).values
    return Targets(ids, lp, offsets)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int = 0
) -> list[list[int]]:
    """transformers' ``get_length_grouped_indices`` (TRL ``group_by_length``), cut into batches.

    Shuffle; sort by length (longest first) inside mega-batches of ``mega_batch_mult ×
    batch_size``; move the longest sample to the first batch. ``mega_batch_mult = 0`` uses the
    Trainer's rule ``min(n // (4 · batch_size), 50)``, at least 1.
    """
    n = len(lengths)
    mult = mega_batch_mult or max(1, min(n // (batch_size * 4), 50))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    size = mult * batch_size
    megas = [sorted(perm[i : i + size], key=lambda j: -lengths[j]) for i in range(0, n, size)]
    top = max(range(len(megas)), key=lambda m: lengths[megas[m][0]])
    megas[0][0], megas[top][0] = megas[top][0], megas[0][0]
    flat = [i for mb in megas for i in mb]
    return [flat[i : i + batch_size] for i in range(0, n, batch_size)]


# ---------------------------------------------------------------- the student and its step
def build_student(size: str, seed: int, device: torch.device) -> Qwen2ForCausalLM:
    if size not in MODEL_SIZES:
        raise ConfigError(f"model size {size!r}: choose one of {', '.join(MODEL_SIZES)}")
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        **MODEL_SIZES[size],
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        use_cache=False,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).to(device)


def load_student(path: str | Path, device: torch.device) -> PreTrainedModel:
    """An HF checkpoint as the student (float32 master weights, as the learner loads it)."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"--model {path}: not an HF checkpoint (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_attn_implementation("sdpa")
    return model.to(device)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_flops(dev: torch.device, peak_tflops: float | None) -> float | None:
    if peak_tflops:
        return peak_tflops * 1e12
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for key, v in PEAK_BF16 if key in name), None)


@dataclass
class Layout:
    """How batches enter the model: packed (position ids) or padded (2D attention mask)."""

    padded: bool
    attention: str
    flatten: bool = False  # rows → one (1, B·T) row: the flash-attention varlen path


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: PackedBatch,
    targets: Targets,
    layout: Layout,
    spec: StepSpec,
    bf16: bool,
) -> tuple[float, torch.Tensor]:
    """The learner's optimizer step (at the spec's peak lr), timed to the end of its kernels;
    returns (seconds, detached loss)."""
    t0 = time.perf_counter()
    loss = optimizer_step(
        model,
        opt,
        batch,
        targets,
        spec,
        lr=spec.lr,
        step=0,
        bf16=bf16,
        padded=layout.padded,
        flatten=layout.flatten,
    )
    if loss.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, loss


def layout_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    targets: Targets,
    layout: Layout,
    spec: StepSpec,
    bf16: bool,
) -> float:
    """The learner's loss of ``batch`` entering the model as ``layout`` says (no step)."""
    with torch.no_grad():
        loss = step_loss(
            model, batch, targets, spec, bf16=bf16, padded=layout.padded, flatten=layout.flatten
        )
    return float(loss)


def with_attention(model: Qwen2ForCausalLM, attention: str) -> Qwen2ForCausalLM:
    m = copy.deepcopy(model)
    m.set_attn_implementation(known(attention))  # ours registered first
    return m
