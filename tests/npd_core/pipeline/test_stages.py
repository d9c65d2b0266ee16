"""Stages without Prefect: idempotent writes; the filter gives every dropped row a reason; pack
places every kept sample exactly once within ``max_seq_len``; train consumes exactly the packed
rows (read back from the pack table, never re-derived); rounds whose samples are all dropped."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from npd_core.config import NPDConfig
from npd_core.pipeline import engines, learner
from npd_core.pipeline.spec import RunSpec
from npd_core.pipeline.stages import (
    filter_stage,
    generate_stage,
    pack_stage,
    score_stage,
    train_stage,
)
from npd_core.store import SCORE_COLUMNS, Store, query

PROV = {"flow_run_id": "f", "task_run_id": "t"}
REASONS = {"empty", "unfinished", "non_finite", "below_band", "above_band"}


def _spec(tmp_path, world, **cfg) -> RunSpec:
    Store(tmp_path)
    base = dict(
        rounds=1,
        data={"prompts_per_round": 16},
        generate={"max_new_tokens": 24},
        train={"steps_per_round": 2, "rows_per_step": 2},
        pack={"max_seq_len": 128},
    )
    c = NPDConfig.model_validate({**base, **cfg})
    return RunSpec(
        str(tmp_path),
        "r",
        c.model_dump(mode="json"),
        str(world.teacher),
        str(world.student),
        str(world.train_prompts),
        str(world.eval_prompts),
    )


def _with(spec: RunSpec, **sections: dict) -> RunSpec:
    """The same run with some config sections replaced."""
    config = NPDConfig.model_validate({**spec.config, **sections}).model_dump(mode="json")
    return dataclasses.replace(spec, config=config)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_world) -> RunSpec:
    """Round 1 generated, scored (every view) and filtered once (two samples a prompt, 32 in
    all); the filter keeps every non-empty sample so that pack and train have data to work on."""
    spec = _spec(
        tmp_path_factory.mktemp("scored"),
        tiny_world,
        generate={"max_new_tokens": 24, "n_per_prompt": 2},
        filter={"rule": "none", "compute_delta_ifd": True, "drop_unfinished": False},
    )
    for stage in (generate_stage, score_stage, filter_stage):
        stage(spec, 1, PROV)
    return spec


def _kept_lengths(spec: RunSpec) -> dict[tuple[str, int], tuple[int, int]]:
    """(prompt_id, sample_idx) → (prompt tokens, prompt + response tokens) of the kept samples."""
    rows = query(
        spec.store.db_path,
        "select prompt_id, sample_idx, prompt_tokens, response_tokens from samples "
        "where kept and round = 1",
    ).to_pylist()
    return {
        (x["prompt_id"], x["sample_idx"]): (
            x["prompt_tokens"],
            x["prompt_tokens"] + x["response_tokens"],
        )
        for x in rows
    }


def test_stage_rerun_is_idempotent(tmp_path, tiny_world):
    spec = _spec(tmp_path, tiny_world)
    q = "select * exclude (created_at) from samples order by prompt_id, sample_idx"
    first = [generate_stage(spec, 1, PROV), score_stage(spec, 1, PROV), filter_stage(spec, 1, PROV)]
    rows = query(spec.store.db_path, q)
    again = [generate_stage(spec, 1, PROV), score_stage(spec, 1, PROV), filter_stage(spec, 1, PROV)]
    assert [a.digest for a in first] == [b.digest for b in again]
    assert query(spec.store.db_path, q).equals(rows) and rows.num_rows == 16
    hidden = [p for p in (tmp_path / "runs").rglob(".*") if p.is_dir()]
    assert hidden == []  # no temp or trash folders left behind


def test_filter_records_a_reason_for_every_dropped_row(scored):
    """The quantile band (0.05–0.90 of the non-empty samples): kept rows lie inside it and
    have no reason; every other row has exactly one reason, and the metrics count them."""
    spec = _with(scored, filter={"rule": "band", "drop_unfinished": False})
    try:
        res = filter_stage(spec, 1, PROV)
        f = spec.store.read_stage("r", 1, "filter", "filter").to_pylist()
    finally:
        filter_stage(scored, 1, PROV)  # the other tests' data: every non-empty sample kept
    scores = spec.store.read_stage("r", 1, "score", "scores")
    sc = scores.column("delta_ifd").to_pylist()
    kl = np.array(scores.column("student_forward_kl_sum").to_pylist())
    assert (kl >= 0).all() and kl.sum() > 0
    kept = np.array([x["kept"] for x in f])
    assert res.metrics.dropped_kl_share == pytest.approx(kl[~kept].sum() / kl.sum())
    assert {x["rule"] for x in f} == {"band"}
    assert json.loads(f[0]["rule_params"]) == dict(
        q_low=0.05,
        q_high=0.9,
        abs_low=None,
        abs_high=None,
        score="delta_ifd",
        ifd_form="log_ratio",
        drop_unfinished=False,
    )
    assert len(f) == len(sc) == 32
    assert all((x["filter_reason"] is None) == x["kept"] for x in f)
    reason = [x["filter_reason"] for x in f]
    dropped = Counter(x for x in reason if x is not None)
    m = res.metrics
    assert set(dropped) <= REASONS and m.drop_reasons == dict(dropped)
    assert m.n_kept + sum(dropped.values()) == 32 and 0 < m.n_kept < 32
    assert m.kept_fraction == pytest.approx(m.n_kept / 32)
    lo, hi = m.band_low, m.band_high
    for why, d in zip(reason, sc, strict=True):
        assert why != "below_band" or d < lo
        assert why != "above_band" or d > hi
        assert why is not None or lo <= d <= hi


def test_scoring_pays_only_for_what_the_rule_uses(scored):
    """``rule: none`` scores no prompt-less view and no student: those columns are null (not a
    made-up number), and the teacher's top-k and log-likelihoods are bitwise those of the run
    that scored every view."""
    full = scored.store.read_stage("r", 1, "score", "scores")
    lean = _with(scored, filter={"rule": "none", "drop_unfinished": False})
    try:
        res = score_stage(lean, 1, PROV)
        t = lean.store.read_stage("r", 1, "score", "scores")
        flt = filter_stage(lean, 1, PROV)
        f = lean.store.read_stage("r", 1, "filter", "filter").to_pylist()
    finally:
        score_stage(scored, 1, PROV)
        filter_stage(scored, 1, PROV)
    assert res.metrics.views == 1
    for name in (*SCORE_COLUMNS[1:], "student_forward_kl_sum"):
        assert t.column(name).null_count == 32, name
    for name in ("teacher_logprob_sum", "topk_ids", "topk_logprobs"):
        assert t.column(name).equals(full.column(name)), name
    assert flt.metrics.dropped_kl_share is None and flt.metrics.delta_ifd_q50 is None
    samples = scored.store.read_stage("r", 1, "generate", "samples").to_pylist()
    empty = {(x["prompt_id"], x["sample_idx"]) for x in samples if x["response_tokens"] == 0}
    assert all(x["kept"] == ((x["prompt_id"], x["sample_idx"]) not in empty) for x in f)
    assert {(x["rule"], x["rule_params"]) for x in f} == {("none", '{"drop_unfinished": false}')}


def test_conditional_score_needs_no_view(scored):
    """``filter.score: conditional``: one scored view (no student pass), and the rule's bound is
    the quantile of L_c^T − L_c^S from the teacher's stored sum and the generator's own."""
    cfg = {"rule": "upper", "score": "conditional", "q_high": 0.75, "drop_unfinished": False}
    spec = _with(scored, filter=cfg)
    try:
        res = score_stage(spec, 1, PROV)
        flt = filter_stage(spec, 1, PROV)
        t = spec.store.read_stage("r", 1, "score", "scores")
    finally:
        score_stage(scored, 1, PROV)
        filter_stage(scored, 1, PROV)
    s = spec.store.read_stage("r", 1, "generate", "samples")
    n = np.array(s.column("response_tokens").to_pylist(), dtype=float)
    gen = np.array(s.column("sample_logprob_sum").to_pylist(), dtype=float)
    teacher = np.array(t.column("teacher_logprob_sum").to_pylist(), dtype=float)
    cond = (gen - teacher)[n > 0] / n[n > 0]
    assert res.metrics.views == 1 and t.column("delta_ifd").null_count == 32
    assert flt.metrics.band_high == pytest.approx(np.quantile(cond, 0.75))
    assert flt.metrics.n_kept == int((cond <= np.quantile(cond, 0.75)).sum())


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_pack_places_every_kept_sample_once_within_the_row(scored, overlong):
    kept = _kept_lengths(scored)
    longest_prompt = max(p for p, _ in kept.values())
    totals = sorted(n for _, n in kept.values())
    max_len = max(8, longest_prompt + 1, totals[len(totals) // 2])  # about half are overlong
    over = {k for k, (_, n) in kept.items() if n > max_len}
    assert len(kept) >= 16 and over  # the case under test exists

    spec = _with(scored, pack={"max_seq_len": max_len, "overlong": overlong})
    res = pack_stage(spec, 1, PROV)
    pk = spec.store.read_stage("r", 1, "pack", "pack").to_pylist()
    length = {(x["prompt_id"], x["sample_idx"]): x["length"] for x in pk}
    assert len(length) == len(pk)  # each sample once
    if overlong == "truncate":
        assert set(length) == set(kept) and res.metrics.dropped_overlong == 0
        assert all(n == min(kept[k][1], max_len) for k, n in length.items())
    else:
        assert set(length) == set(kept) - over and res.metrics.dropped_overlong == len(over)
        assert all(n == kept[k][1] for k, n in length.items())
    rows: dict[int, list[dict]] = {}
    for x in pk:
        rows.setdefault(x["row"], []).append(x)
    assert sorted(rows) == list(range(len(rows))) == list(range(res.metrics.rows))
    for row in rows.values():
        assert sorted(x["slot"] for x in row) == list(range(len(row)))
        assert sum(x["length"] for x in row) <= max_len
    tokens = sum(x["length"] for x in pk)
    assert res.metrics.packed_tokens == tokens
    assert res.metrics.fill_ratio == pytest.approx(tokens / (len(rows) * max_len))


def test_train_consumes_exactly_the_packed_rows(scored):
    """One pass, one row a step: every packed row is trained once, so the round's tokens are
    the pack table's; and when the pack table changes, training follows the table."""
    kept = _kept_lengths(scored)
    max_len = max(8, max(p for p, _ in kept.values()) + 4)
    assert any(n > max_len for _, n in kept.values())  # samples cut by the overlong policy
    spec = _with(
        scored,
        pack={"max_seq_len": max_len},
        train={"steps_per_round": 1000, "epochs_per_round": 1.0, "rows_per_step": 1},
    )
    pack = pack_stage(spec, 1, PROV)
    pk = spec.store.read_stage("r", 1, "pack", "pack")
    tokens = pack.metrics.packed_tokens
    response = sum(x["length"] - kept[(x["prompt_id"], x["sample_idx"])][0] for x in pk.to_pylist())
    tr = train_stage(spec, 1, PROV).metrics
    n_rows = pack.metrics.rows
    assert tr.steps == n_rows and tr.train_tokens == tokens and tr.loss_tokens == response
    assert tr.fill_ratio == pytest.approx(tokens / (n_rows * max_len))
    ckpt = query(spec.store.db_path, "select step, train_tokens from checkpoints").to_pylist()
    assert ckpt == [{"step": n_rows, "train_tokens": tokens}]

    # keep row 0 only, each sample cut to its prompt and one response token: train reads that
    row0 = pk.filter(pc.equal(pk.column("row"), 0)).to_pylist()
    for x in row0:
        x["length"] = kept[(x["prompt_id"], x["sample_idx"])][0] + 1
    spec.store.write_stage("r", 1, "pack", {"pack": pa.Table.from_pylist(row0, pk.schema)})
    tr = train_stage(spec, 1, PROV).metrics
    assert tr.steps == 1 and tr.loss_tokens == len(row0)
    assert tr.train_tokens == sum(x["length"] for x in row0)


def test_score_and_train_run_with_the_kernels_recorded_in_the_spec(scored, monkeypatch):
    """Each stage takes its role's kernel from the spec (a retry reads the same spec); a spec
    without a choice trains with the fixed sdpa_varlen; every kernel gives the same numbers."""
    seen = []
    real = engines.packed_attention

    def spy(model, name):
        seen.append(name)
        return real(model, name)

    monkeypatch.setattr(engines, "packed_attention", spy)  # score's engine
    before = scored.store.read_stage("r", 1, "score", "scores")
    spec = dataclasses.replace(
        scored, attention={"train": "sdpa", "score_teacher": "sdpa_varlen", "score_student": "sdpa"}
    )
    try:
        score_stage(spec, 1, PROV)
        after = spec.store.read_stage("r", 1, "score", "scores")
    finally:
        score_stage(scored, 1, PROV)  # the other tests' data, bitwise
    assert seen == ["sdpa_varlen", "sdpa", None, None]  # teacher, student; then no choice
    for name in ("teacher_logprob_sum", "student_logprob_sum", "delta_ifd"):
        got, want = (np.array(t.column(name).to_pylist(), float) for t in (after, before))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=name)
    flat = [pc.list_flatten(pc.list_flatten(t.column("topk_logprobs"))) for t in (after, before)]
    got, want = (np.array(x) for x in flat)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # ids may swap where values tie

    class Stop(Exception):
        pass

    used = []

    def train_round(model, *args, **kw):
        used.append(model.config._attn_implementation)
        raise Stop  # the kernel is all this test needs of the round

    monkeypatch.setattr(learner, "train_round", train_round)
    pack_stage(scored, 1, PROV)
    for s in (spec, scored, dataclasses.replace(scored, attention={})):
        with pytest.raises(Stop):
            train_stage(s, 1, PROV)
    assert used == ["sdpa", "sdpa_varlen", "sdpa_varlen"]


def test_everything_filtered_trains_nothing_and_goes_on(tmp_path, tiny_world):
    spec = _spec(tmp_path, tiny_world, filter={"rule": "band", "abs_low": 100.0, "abs_high": 200.0})
    for stage in (generate_stage, score_stage, filter_stage):
        stage(spec, 1, PROV)
    flt = filter_stage(spec, 1, PROV)
    assert flt.metrics.n_kept == 0
    assert set(flt.metrics.drop_reasons) <= {"below_band", "unfinished", "empty", "non_finite"}
    assert sum(flt.metrics.drop_reasons.values()) == 16  # every row has its reason
    pack = pack_stage(spec, 1, PROV).metrics
    assert pack.rows == pack.packed_tokens == pack.dropped_overlong == 0
    tr = train_stage(spec, 1, PROV)
    assert tr.metrics.steps == 0 and tr.metrics.train_tokens == 0
    ckpt = query(spec.store.db_path, "select step, train_tokens from checkpoints").to_pylist()
    assert ckpt == [{"step": 0, "train_tokens": 0}]  # θ_1 = θ_0, and the run goes on
    n = query(spec.store.db_path, "select count(*) from samples where filter_reason is null")
    assert n.column(0)[0].as_py() == 0


def test_every_generation_empty_trains_nothing_and_goes_on(tmp_path, tiny_world):
    """A student that answers nothing (EOS first, every time): score, filter, pack and train
    still run; every row is dropped as 'empty' and the round trains nothing."""
    spec = _spec(tmp_path, tiny_world)
    generate_stage(spec, 1, PROV)
    s = spec.store.read_stage("r", 1, "generate", "samples")
    n = s.num_rows
    empty = s.set_column(
        s.schema.get_field_index("response_token_ids"),
        "response_token_ids",
        pa.array([[]] * n, pa.list_(pa.int32())),
    )
    for name, value in (("response", ""), ("response_tokens", 0), ("finished", True)):
        i = empty.schema.get_field_index(name)
        empty = empty.set_column(i, name, pa.array([value] * n, s.schema.field(name).type))
    spec.store.write_stage("r", 1, "generate", {"samples": empty})
    score_stage(spec, 1, PROV)
    flt = filter_stage(spec, 1, PROV)
    assert flt.metrics.n_kept == 0 and flt.metrics.drop_reasons == {"empty": n}
    assert pack_stage(spec, 1, PROV).metrics.rows == 0
    assert train_stage(spec, 1, PROV).metrics.steps == 0
