"""Sequence packing: best-fit-decreasing of samples into rows of ``max_seq_len`` tokens.

Once the round's samples exist ahead of time, training is SFT, and SFT can pack variable-length
samples into full rows instead of padding them. Example with ``max_seq_len = 8`` and two samples
``a = [p1 p2 | r1 r2]`` (2 prompt + 2 response tokens) and ``b = [q1 | s1 s2]``::

    input_ids     p1  p2  r1  r2  q1  s1  s2  PAD
    labels        -   r1  r2  -   s1  s2  -   -      (label at t = token t+1 of the same sequence)
    position_ids  0   1   2   3   0   1   2   0
    seq_ids       0   0   0   0   1   1   1   -1     (the sample's index; -1 = padding)
    cu_seqlens    [0, 4, 7]

Padding positions restart at 0 too, so the padding tail is a segment of its own.

Labels are pre-shifted so that a row never predicts across a boundary, prompt positions carry
``IGNORE_INDEX``, and position ids restart at each sequence, which is what lets transformers build a
block-diagonal causal mask (or the flash-attention varlen path) from ``position_ids`` alone.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Literal

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Sample:
    """One tokenized sample: ``prompt_ids + response_ids``; only the response carries loss."""

    prompt_ids: list[int]
    response_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def cut(self, n: int) -> Sample:
        """The sample's first ``n`` tokens: the response cut, the prompt kept whole."""
        assert n >= len(self.prompt_ids), "a cut never reaches into the prompt"
        return Sample(self.prompt_ids, self.response_ids[: n - len(self.prompt_ids)])


@dataclass
class PackedBatch:
    """Rows of packed samples. Shapes: (B, T) for all tensors; ``cu_seqlens`` per row."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # (B, T) long, restart at 0 per sequence
    seq_ids: torch.Tensor  # (B, T) long, index into ``samples`` of the position's sample; -1 = pad
    target_index: (
        torch.Tensor
    )  # (B, T) long, index into the flat response-position table; -1 = none
    cu_seqlens: list[list[int]]  # per row: cumulative lengths of the real sequences
    sample_index: list[list[int]]  # per row: the indices of the samples it holds, in order

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_loss_sequences(self) -> int:
        """Sequences with at least one response position (``train.normalize: sequence``)."""
        return int(self.seq_ids[self.labels != IGNORE_INDEX].unique().numel())

    @property
    def n_real_tokens(self) -> int:
        return int((self.seq_ids >= 0).sum())


def fit_lengths(
    samples: list[Sample], max_seq_len: int, overlong: Literal["truncate", "drop"]
) -> tuple[list[Sample], list[int]]:
    """Apply the overlong policy. Returns the kept samples and their original indices.

    A sample never spills into the next row: it is either cut at ``max_seq_len`` (response
    truncated; a sample whose prompt alone fills the row is dropped) or dropped whole.
    """
    kept, index = [], []
    for i, s in enumerate(samples):
        if len(s) <= max_seq_len:
            kept.append(s)
        elif overlong == "truncate" and len(s.prompt_ids) < max_seq_len:
            kept.append(s.cut(max_seq_len))
        else:
            continue
        index.append(i)
    return kept, index


def best_fit_decreasing(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Assign items to bins: longest first, each into the fullest bin that still fits it.

    Ties in length are broken by a seeded shuffle, so packing is deterministic for a seed.
    Returns bins as lists of item indices; bins are shuffled with the same seed so that a
    training step does not always see the longest samples first. O(n log n) via a sorted list
    of remaining capacities.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} of length {n} exceeds capacity {capacity}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            rem, b = free.pop(j)
        else:
            rem, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if rem - n > 0:
            bisect.insort(free, (rem - n, b))
    random.Random(seed + 1).shuffle(bins)
    return bins


def greedy_stream(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit in arrival order with one open row: for data streamed from disk."""
    bins: list[list[int]] = []
    used = capacity
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} of length {n} exceeds capacity {capacity}")
        if not bins or used + n > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def pack(
    lengths: list[int],
    max_seq_len: int,
    mode: Literal["bfd", "greedy"] = "bfd",
    seed: int = 0,
) -> list[list[int]]:
    """Group sample indices into rows of at most ``max_seq_len`` tokens."""
    if mode == "bfd":
        return best_fit_decreasing(lengths, max_seq_len, seed)
    return greedy_stream(lengths, max_seq_len)


def packed_rows(
    samples: list[Sample],
    max_seq_len: int,
    overlong: Literal["truncate", "drop"],
    mode: Literal["bfd", "greedy"],
    seed: int,
) -> tuple[list[Sample], list[int], list[list[int]]]:
    """Apply the overlong policy, then pack. Returns the kept samples (cut where truncated),
    their indices in ``samples``, and the rows as indices into the kept samples."""
    kept, index = fit_lengths(samples, max_seq_len, overlong)
    rows = pack([len(s) for s in kept], max_seq_len, mode, seed)
    return kept, index, rows


def response_offsets(samples: list[Sample]) -> list[int]:
    """Where each sample's response positions start in a flat table of per-position targets
    (``collate``'s ``target_offsets`` for samples whose targets are laid out in order)."""
    out, at = [], 0
    for s in samples:
        out.append(at)
        at += len(s.response_ids)
    return out


def collate(
    samples: list[Sample],
    rows: list[list[int]],
    pad_id: int,
    row_len: int | None = None,
    target_offsets: list[int] | None = None,
) -> PackedBatch:
    """Lay the given rows of sample indices out as tensors (see the module docstring).

    ``row_len`` defaults to the longest row (so a padded one-sample-per-row batch is the same
    call with ``rows = [[i] for i in ...]``). ``target_offsets[i]`` is where sample ``i``'s
    response positions start in a flat table of per-position teacher targets; position t of the
    row then maps to that table in ``target_index`` (prediction of response token k sits at
    the position before it).
    """
    lens = [sum(len(samples[i]) for i in row) for row in rows]
    T = row_len or max(lens)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    seq_ids = torch.full((B, T), -1, dtype=torch.long)
    target_index = torch.full((B, T), -1, dtype=torch.long)
    cu_seqlens: list[list[int]] = []
    for b, row in enumerate(rows):
        t = 0
        cu = [0]
        for i in row:
            s = samples[i]
            ids = s.prompt_ids + s.response_ids
            n, p, r = len(ids), len(s.prompt_ids), len(s.response_ids)
            if p == 0 and r:
                # its first response token has no context; its label would land in the
                # previous sequence (or wrap to the row's end)
                raise ValueError(f"sample {i} has an empty prompt: prepend a start token (BOS)")
            input_ids[b, t : t + n] = torch.tensor(ids)
            position_ids[b, t : t + n] = torch.arange(n)
            seq_ids[b, t : t + n] = i
            # position p-1+k predicts response token k (k = 0..r-1)
            labels[b, t + p - 1 : t + p - 1 + r] = torch.tensor(s.response_ids)
            if target_offsets is not None:
                start = target_offsets[i]
                target_index[b, t + p - 1 : t + p - 1 + r] = torch.arange(start, start + r)
            t += n
            cu.append(t)
        position_ids[b, t:] = torch.arange(T - t)
        cu_seqlens.append(cu)
    return PackedBatch(input_ids, labels, position_ids, seq_ids, target_index, cu_seqlens, rows)


def fill_ratio(batch: PackedBatch) -> float:
    """Non-pad tokens ÷ row capacity."""
    return batch.n_real_tokens / batch.input_ids.numel()
