"""Batched sampling with a KV cache (HF backend).

A short loop of our own instead of ``model.generate``: every sample draws from its own seed
with counter-based Gumbel-max noise (``npd_core.seeds``), so a sample depends only on its seed,
never on the batch it was decoded in, the batch order, a global RNG or another thread; it returns
the log-prob of every sampled token and stops as soon as every row has emitted EOS. Rows are
left-padded; position ids follow the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from inspect import signature

import torch
from transformers import DynamicCache, PreTrainedModel

from npd_core.method.batching import decode_row_bytes, halving, rows_that_fit
from npd_core.method.noise import gumbel_noise, sample_keys, token_keys
from npd_core.models import autocast


@dataclass
class Generation:
    """One sampled response: token ids (EOS included when seen)."""

    token_ids: list[int]
    logprobs: list[float]  # of each sampled token under the model at temperature 1
    finished: bool  # EOS (or a stop string) seen

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask tokens outside the smallest set whose probability mass reaches ``top_p``. (B, V)."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


def last_logits_only(model: PreTrainedModel) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: the prefill then runs the head on each
    row's last position only, not on every prompt token (at a 49,152-token vocabulary the head
    costs as much as 8 decoder layers, and a 60-token prompt's logits take 12 MB a row)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in signature(model.forward).parameters else {}


@torch.no_grad()
def sample_batch(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    temperature: float,
    top_p: float,
    seeds: list[int],
    bf16: bool = True,
) -> list[Generation]:
    """Decode one batch; row i draws from ``seeds[i]``. ``temperature == 0`` is greedy."""
    dev = next(model.parameters()).device
    B = len(prompts)
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    eos = torch.tensor(sorted(eos_ids), device=dev)
    cache = DynamicCache(config=model.config)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    logps = torch.zeros((B, max_new_tokens), device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
    step_ids, pos = ids, (mask.cumsum(-1) - 1).clamp_min(0)
    keys = sample_keys(torch.tensor(seeds, dtype=torch.long, device=dev))  # (B,)
    tokens: torch.Tensor | None = None  # (V,) per-token keys, made at the first sampled step
    last = last_logits_only(model)
    for t in range(max_new_tokens):
        with autocast(bf16):
            logits = (
                model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    **last,
                )
                .logits[:, -1]
                .float()
            )  # (B, V)
        logp = torch.log_softmax(logits, -1)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            scaled = logits / temperature
            if top_p < 1.0:
                scaled = _top_p_filter(scaled, top_p)
            if tokens is None:
                tokens = token_keys(scaled.shape[-1], dev)
            nxt = (scaled + gumbel_noise(keys, t, tokens)).argmax(-1)  # Gumbel-max: one draw
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        logps[:, t] = torch.where(done, 0.0, logp.gather(-1, nxt[:, None]).squeeze(-1))
        hit = torch.isin(nxt, eos) & ~done
        lengths = torch.where(hit, t + 1, lengths)
        done |= hit
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
    out, lengths, done, logps = out.cpu(), lengths.cpu(), done.cpu(), logps.cpu()
    return [
        Generation(out[i, : lengths[i]].tolist(), logps[i, : lengths[i]].tolist(), bool(done[i]))
        for i in range(B)
    ]


def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    n_per_prompt: int,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    temperature: float,
    top_p: float,
    seeds: list[list[int]] | None,
    batch_size: int,
    bf16: bool = True,
    memory: int | None = None,
    stage: str = "generate",
    halve_on_oom: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[list[Generation]]:
    """``n_per_prompt`` samples for every prompt, batched by similar prompt length; sample k of
    prompt i draws from ``seeds[i][k]`` (``npd_core.seeds.seed_for``; None when greedy).

    A batch takes at most ``batch_size`` rows and, with a ``memory`` budget (bytes), only as
    many as their KV caches and logits fit in (``method.batching``); an out-of-memory error
    halves the batch and decodes it again (``stage`` names it in the log and the error), unless
    ``halve_on_oom`` is False (a benchmark timing this batch size): then it propagates.
    Returns ``out[prompt_index][sample_idx]``. A sample depends on its prompt and seed only, not
    on the batch it decodes in or the order of ``prompts``.
    """
    assert seeds is not None or temperature == 0, "sampling needs a seed per sample"
    model.eval()
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n_per_prompt)]
    jobs.sort(key=lambda j: len(prompts[j[0]]))
    out: list[list[Generation | None]] = [[None] * n_per_prompt for _ in prompts]

    def row_bytes(j: int) -> int:  # job j padded to its batch's longest prompt (sorted: its own)
        return decode_row_bytes(model, len(prompts[jobs[j][0]]) + max_new_tokens, bf16)

    def fit(start: int, cap: int) -> int:
        cap = min(cap, batch_size, len(jobs) - start)
        return rows_that_fit(memory, cap, lambda n: row_bytes(start + n - 1))

    def run(start: int, end: int) -> list[Generation]:
        chunk = jobs[start:end]
        return sample_batch(
            model,
            [prompts[i] for i, _ in chunk],
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids,
            pad_id=pad_id,
            temperature=temperature,
            top_p=top_p,
            seeds=[seeds[i][k] if seeds else 0 for i, k in chunk],
            bf16=bf16,
        )

    batches = halving(stage, len(jobs), fit, run, row_bytes, halve=halve_on_oom)
    for start, end, res in batches:
        for (i, k), g in zip(jobs[start:end], res, strict=True):
            out[i][k] = g
        if progress:
            progress(end - start)
    return out  # type: ignore[return-value]


def apply_stop_strings(
    gen: Generation, decode: Callable[[list[int]], str], stops: list[str]
) -> tuple[Generation, str]:
    """Cut a generation at the first stop string; returns it and its text."""
    text = decode(gen.token_ids)
    if not stops or not any(s in text for s in stops):
        return gen, text
    for n in range(1, len(gen.token_ids) + 1):
        prefix = decode(gen.token_ids[:n])
        if any(s in prefix for s in stops):
            return Generation(gen.token_ids[:n], gen.logprobs[:n], True), prefix
    return gen, text
