"""D_r as the pack stage laid it out, read back for the learner: the packed samples in (row,
slot) order with their keys, the rows, and the teacher targets decoded for those samples only
(with the per-token log-probs when the loss or the step weights need them)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from npd_core.config import NPDConfig
from npd_core.errors import TrainingError
from npd_core.method.packing import Sample
from npd_core.method.train import Targets
from npd_core.pipeline.learner import RoundRows
from npd_core.pipeline.mix import fixed_mask
from npd_core.pipeline.spec import RunSpec

SAMPLE_KEY = ["prompt_id", "sample_idx"]  # a sample's key within its round


def needs_generator_logprobs(cfg: NPDConfig) -> bool:
    """Whether the generate stage stores each sampled token's log-prob for the learner: the
    sampled-token loss reads it, and so do the step weights of a ``learner_ratio`` rule."""
    return cfg.train.needs_token_logprobs or cfg.filter.weighs_steps


def samples_of(table: pa.Table) -> list[Sample]:
    pairs = zip(
        table.column("prompt_token_ids").to_pylist(),
        table.column("response_token_ids").to_pylist(),
        strict=True,
    )
    return [Sample(p, y) for p, y in pairs]


def packed_round(spec: RunSpec, r: int) -> RoundRows:
    """D_r exactly as the pack stage laid it out, nothing re-derived: sample i is the pack
    table's i-th entry in (row, slot) order, cut to the length packed there (the overlong
    policy ran once, in the pack stage); rows are lists of those indices; the teacher targets
    are decoded for the packed samples only."""
    store = spec.store
    pk = store.read_stage(spec.run_id, r, "pack", "pack")
    pk = pk.sort_by([("row", "ascending"), ("slot", "ascending")])
    s = store.read_stage(spec.run_id, r, "generate", "samples")
    where = {key: i for i, key in enumerate(_sample_keys(s))}
    keys = _sample_keys(pk)
    at = pa.array([where[key] for key in keys], pa.int64())
    lengths = pk.column("length").to_pylist()
    samples = [x.cut(n) for x, n in zip(samples_of(s.take(at)), lengths, strict=True)]
    row_of = pk.column("row").to_pylist()
    rows: list[list[int]] = [[] for _ in range(1 + max(row_of, default=-1))]
    for i, b in enumerate(row_of):
        rows[b].append(i)
    if not samples:
        return RoundRows(samples, rows, None, keys)
    sc = store.read_stage(spec.run_id, r, "score", "scores").take(at)
    ids = _topk_arrays(sc.column("topk_ids"), np.int64)
    lps = _topk_arrays(sc.column("topk_logprobs"), np.float32)
    teacher = generator = None
    if spec.cfg.train.needs_token_logprobs:
        teacher = _token_arrays(sc.column("teacher_token_logprobs"), ids)
    if needs_generator_logprobs(spec.cfg):
        generator = _generator_arrays(s.take(at), ids, keys, r)
    return RoundRows(samples, rows, Targets.from_lists(ids, lps, teacher, generator), keys)


def _generator_arrays(
    s: pa.Table, like: list[np.ndarray], keys: list[tuple[str, int]], r: int
) -> list[np.ndarray]:
    """``samples.token_logprobs`` of the packed samples ``s`` (:func:`_token_arrays`); a
    student's sample without them (a round written for another config) is refused."""
    names = s.schema.names
    col = s.column("token_logprobs") if "token_logprobs" in names else pa.nulls(len(s))
    for key, fixed, null in zip(keys, fixed_mask(s), pc.is_null(col).to_pylist(), strict=True):
        if not fixed and null:
            raise TrainingError(
                f"round {r} sample {key[0]}/{key[1]}: samples.token_logprobs is null, and "
                "train.loss sampled_reverse_kl and filter.score learner_ratio read the "
                "generator's per-token log-probs there; rerun the round from its generate stage"
            )
    return _token_arrays(col, like)


def _token_arrays(col: pa.ChunkedArray, like: list[np.ndarray]) -> list[np.ndarray]:
    """list<float> column → one (positions,) float32 array per row, as long as ``like``'s; NaN
    where a row has none (a sequence without a generator: data.mix)."""
    return [
        np.full(len(n), np.nan, np.float32) if x is None else np.asarray(x, np.float32)
        for x, n in zip(col.to_pylist(), like, strict=True)
    ]


def _sample_keys(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(*(table.column(c).to_pylist() for c in SAMPLE_KEY), strict=True))


def _topk_arrays(col: pa.ChunkedArray, dtype: type) -> list[np.ndarray]:
    """list<list<x>> column → one (positions, k) array per row, without a Python loop per value."""
    out: list[np.ndarray] = []
    for chunk in col.chunks:
        n_pos = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)  # (rows,)
        inner = pc.list_flatten(chunk)
        k = int(pc.max(pc.list_value_length(inner)).as_py() or 1) if len(inner) else 1
        flat = pc.list_flatten(inner).to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, k)
        out += np.split(flat, np.cumsum(n_pos)[:-1])
    return out
