"""The choice among the exact packed-attention kernels (npd_core/pipeline/autotune.py): shape
buckets, the probe that races the CPU kernels, a kernel that fails its warm-up losing, and the
choice measured once per bucket and kept across processes; the race itself takes turns in
alternating order and drops a candidate that fails its warm-up."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen2Config

from npd_core.method.attention import SDPA, VARLEN
from npd_core.pipeline import autotune

# a tiny Qwen2's config (the probe builds its own 2-layer model from it)
CONFIG = Qwen2Config(
    vocab_size=48,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=256,
)


def test_buckets_round_lengths_to_the_nearest_of_a_half_octave_grid():
    got = [autotune.bucket_len(n) for n in (1, 8, 9, 11, 13, 16.9, 21, 200, 256, 300, 330)]
    assert got == [8, 8, 8, 12, 12, 16, 24, 192, 256, 256, 384]
    s = autotune.Shape.bucket(backward=True, rows=16, row_len=256, seq_len=300, threads=0)
    assert (s.rows, s.row_len, s.seq_len, s.threads) == (autotune.PROBE_ROWS, 256, 256, 1)


def test_the_probe_times_every_cpu_kernel_on_packed_rows():
    cfg = CONFIG
    shape = autotune.Shape.bucket(backward=True, rows=2, row_len=32, seq_len=8, threads=1)
    ids, pos = autotune.probe_rows(shape, vocab=48)
    assert ids.shape == pos.shape == (2, 32) and (pos[:, 0] == 0).all()
    step = pos[:, 1:] - pos[:, :-1]
    assert (pos == 0).sum(-1).min() >= 3 and ((step == 1) | (pos[:, 1:] == 0)).all()  # seq 4–12
    seconds = autotune.measure(cfg, shape, autotune.kernels("cpu"), reps=1)
    assert set(seconds) == {SDPA, VARLEN} and min(seconds.values()) > 0


def test_a_kernel_that_fails_its_warm_up_loses_the_race_instead_of_failing_it():
    def broken(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    from transformers import AttentionInterface

    AttentionInterface.register("broken_for_test", broken)
    cfg = CONFIG
    shape = autotune.Shape.bucket(backward=True, rows=2, row_len=32, seq_len=8, threads=1)
    seconds = autotune.measure(cfg, shape, ["broken_for_test", SDPA], reps=1)
    assert seconds["broken_for_test"] == float("inf") and 0 < seconds[SDPA] < 1e9


def test_select_measures_once_per_bucket_and_keeps_it_across_processes(tmp_path, monkeypatch):
    """Same bucket: measured once (this process remembers; a new process reads the cache
    file); another thread count is another bucket. The fastest median wins, stock SDPA within
    5% of it."""
    calls = []
    medians = {1: (2.0, 1.0), 2: (1.0, 2.0), 3: (1.04, 1.0)}  # threads → (sdpa, sdpa_varlen) s

    def fake(config, shape, names, reps):
        calls.append(shape.threads)
        return dict(zip((SDPA, VARLEN), medians[shape.threads], strict=True))

    monkeypatch.setattr(autotune, "_CHOICES", {})
    cfg, cache = CONFIG, tmp_path / "kernels.json"
    one = autotune.Shape.bucket(backward=True, rows=4, row_len=64, seq_len=16, threads=1)
    two = autotune.Shape.bucket(backward=True, rows=4, row_len=64, seq_len=16, threads=2)
    first = autotune.select(cfg, one, cache=cache, measure_fn=fake)
    assert (first.kernel, first.source) == (VARLEN, "measured")
    assert autotune.select(cfg, one, cache=cache, measure_fn=fake).source == "cached"
    monkeypatch.setattr(autotune, "_CHOICES", {})  # as a fresh process
    again = autotune.select(cfg, one, cache=cache, measure_fn=fake)
    assert (again.kernel, again.source) == (VARLEN, "cached")
    assert again.seconds == first.seconds
    assert autotune.select(cfg, two, cache=cache, measure_fn=fake).kernel == SDPA
    three = autotune.Shape.bucket(backward=True, rows=4, row_len=64, seq_len=16, threads=3)
    assert autotune.select(cfg, three, cache=cache, measure_fn=fake).kernel == SDPA
    assert calls == [1, 2, 3] and len(json.loads(cache.read_text())) == 3


def test_the_race_alternates_turns_and_drops_a_candidate_that_fails_its_warm_up():
    """Round 0 is untimed; candidates take turns a, b, c then c, b, a; ``broken`` fails its
    warm-up and is left out; a failure after the warm-up raises."""
    turns = []

    def step(name, seconds):
        def run(i):
            turns.append((i, name))
            if name == "broken" and i == 0:
                raise RuntimeError("not on this GPU")
            return seconds

        return run

    got = autotune.race({"a": step("a", 1.0), "broken": step("broken", 0), "c": step("c", 3.0)}, 2)
    assert got == {"a": [1.0, 1.0], "c": [3.0, 3.0]}
    assert turns == [(0, "a"), (0, "broken"), (0, "c"), (1, "c"), (1, "a"), (2, "a"), (2, "c")]

    def late(i):
        if i == 2:
            raise RuntimeError("out of memory")
        return 1.0

    with pytest.raises(RuntimeError, match="out of memory"):
        autotune.race({"late": late}, 2)


def test_the_learners_bucket_computes_in_bf16_on_cuda_only():
    kw = dict(rows=16, row_len=256, seq_len=300, threads=2)
    cuda = autotune.Shape.learner(device="cuda", bf16=True, **kw)
    assert (cuda.backward, cuda.dtype, cuda.rows, cuda.seq_len) == (True, "bfloat16", 4, 256)
    assert autotune.Shape.learner(device="cuda", bf16=False, **kw).dtype == "float32"
    assert autotune.Shape.learner(device="cpu", bf16=True, **kw).dtype == "float32"
