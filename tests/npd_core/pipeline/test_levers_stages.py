"""The stages behind the on-policy levers, without Prefect: with ``train.loss:
sampled_reverse_kl`` the generate stage stores the generator's log-prob of each sampled token
and the score stage the teacher's, each summing to the row's stored sum; the train stage trains
on them; by default neither is stored (the tables of a default run are as before). Mixed data
(``data.mix``): the fixed source's sequences in the student's stead, told apart by source."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from npd_core.config import NPDConfig
from npd_core.data import read_prompts
from npd_core.errors import TrainingError
from npd_core.models import encode_prompts, load_tokenizer, prompt_texts
from npd_core.pipeline import mix, stages
from npd_core.pipeline.mix import is_mixed
from npd_core.pipeline.spec import RunSpec, rel_path
from npd_core.pipeline.stages import (
    filter_stage,
    generate_stage,
    pack_stage,
    score_stage,
    train_stage,
)
from npd_core.store import Store

PROV = {"flow_run_id": "f", "task_run_id": "t"}


def _round(tmp_path, world, rule: dict | None = None, teacher=None, **train) -> RunSpec:
    """Round 1 generated and scored, with ``train`` settings (and the filter's ``rule``); the
    world's teacher unless ``teacher`` names another checkpoint."""
    Store(tmp_path)
    c = NPDConfig.model_validate(
        dict(
            rounds=1,
            models={"bf16": False},
            data={"prompts_per_round": 8},
            generate={"max_new_tokens": 24},
            filter={"rule": "none", "drop_unfinished": False, **(rule or {})},
            train={"steps_per_round": 2, "rows_per_step": 2, **train},
            pack={"max_seq_len": 128},
        )
    )
    spec = RunSpec(
        str(tmp_path),
        "r",
        c.model_dump(mode="json"),
        str(teacher or world.teacher),
        str(world.student),
        str(world.train_prompts),
        str(world.eval_prompts),
    )
    for stage in (generate_stage, score_stage):
        stage(spec, 1, PROV)
    return spec


def test_the_sampled_token_loss_gets_per_token_log_probs_and_trains(tmp_path, tiny_world):
    spec = _round(tmp_path, tiny_world, loss="sampled_reverse_kl", normalize="sequence")
    q = """SELECT g.source, g.response_tokens, g.token_logprobs, g.sample_logprob_sum,
                  s.teacher_token_logprobs, s.teacher_logprob_sum
           FROM samples AS g JOIN scores AS s USING (run_id, round, prompt_id, sample_idx)"""
    rows = spec.store.query(q).to_pylist()
    assert len(rows) == 8 and {x["source"] for x in rows} == {"student"}
    for x in rows:
        gen, teacher = np.array(x["token_logprobs"]), np.array(x["teacher_token_logprobs"])
        assert len(gen) == len(teacher) == x["response_tokens"]
        assert gen.sum() == pytest.approx(x["sample_logprob_sum"], rel=1e-4, abs=1e-4)
        assert teacher.sum() == pytest.approx(x["teacher_logprob_sum"], rel=1e-4, abs=1e-4)
        assert (gen <= 0).all() and (teacher <= 0).all()
    filter_stage(spec, 1, PROV)
    pack_stage(spec, 1, PROV)
    tr = train_stage(spec, 1, PROV).metrics
    assert tr.steps == 2 and math.isfinite(tr.mean_loss)
    assert spec.store.query("SELECT count(*) AS n FROM step_weights").to_pylist() == [{"n": 0}]


def test_self_distillation_gives_the_sampled_token_loss_no_advantage(tmp_path, tiny_world):
    """Teacher = student: the score stage's log-prob of each sampled token is the generator's
    own at the same position (the scoring forward against the decoding one), so every
    advantage, and the first step's loss, is 0. A column shifted by one token fails here."""
    spec = _round(
        tmp_path,
        tiny_world,
        teacher=tiny_world.student,
        loss="sampled_reverse_kl",
        steps_per_round=1,
    )
    q = """SELECT g.token_logprobs, s.teacher_token_logprobs
           FROM samples AS g JOIN scores AS s USING (run_id, round, prompt_id, sample_idx)"""
    rows = spec.store.query(q).to_pylist()
    assert len(rows) == 8
    for x in rows:
        gen, teacher = np.array(x["token_logprobs"]), np.array(x["teacher_token_logprobs"])
        np.testing.assert_allclose(teacher, gen, atol=1e-3)
    # log-probs that differ by nats from token to token, so a shifted column could not match
    every = np.concatenate([x["token_logprobs"] for x in rows])
    assert every.max() - every.min() > 1.0
    filter_stage(spec, 1, PROV)
    pack_stage(spec, 1, PROV)
    tr = train_stage(spec, 1, PROV).metrics
    assert tr.steps == 1 and abs(tr.mean_loss) < 1e-3


def test_a_learner_ratio_rule_weighs_the_train_steps_and_stores_the_weights(tmp_path, tiny_world):
    """filter.score learner_ratio under a band of absolute bounds ±0.5: the generate stage
    stores the generator's per-token log-probs (the teacher's are not needed), the filter stage
    drops nothing by it, and the train stage records each packed sample's ratio and weight in
    every step (step_weights, joined to samples by key). At the first step the learner is the
    generator (θ_0, staleness 1): every ratio is 0 within 1e-4, the packed training forward
    agreeing with the decoding one, and every weight 1."""
    band = {"rule": "band", "score": "learner_ratio", "abs_low": -0.5, "abs_high": 0.5}
    spec = _round(tmp_path, tiny_world, band)
    q = "SELECT count(g.token_logprobs) AS gen, count(s.teacher_token_logprobs) AS teacher "
    q += "FROM samples AS g JOIN scores AS s USING (run_id, round, prompt_id, sample_idx)"
    assert spec.store.query(q).to_pylist() == [{"gen": 8, "teacher": 0}]
    filter_stage(spec, 1, PROV)
    assert spec.store.query("SELECT count(*) AS n FROM filtered").to_pylist() == [{"n": 8}]
    pack_stage(spec, 1, PROV)
    assert train_stage(spec, 1, PROV).metrics.steps == 2
    q = """SELECT w.step, w.ratio, w.weight, g.response_tokens
           FROM step_weights AS w JOIN samples AS g USING (run_id, round, prompt_id, sample_idx)
           ORDER BY w.step"""
    rows = spec.store.query(q).to_pylist()
    assert {x["step"] for x in rows} == {0, 1}
    first = [x for x in rows if x["step"] == 0]
    assert first and all(abs(x["ratio"]) < 1e-4 and x["weight"] == 1.0 for x in first)
    for x in rows:  # the band's bounds decide every weight
        assert x["weight"] == (1.0 if abs(x["ratio"]) <= 0.5 else 0.0)


def test_a_learner_ratio_rule_over_a_round_without_generator_log_probs_is_refused(
    tmp_path, tiny_world
):
    """A round generated under another config (no samples.token_logprobs) cannot be weighed:
    the train stage stops in one line naming the round, a sample and the fix."""
    spec = _round(tmp_path, tiny_world)
    band = {"rule": "band", "score": "learner_ratio", "abs_low": -0.5, "abs_high": 0.5}
    config = {**spec.config, "filter": {**spec.config["filter"], **band}}
    spec = dataclasses.replace(
        spec, config=NPDConfig.model_validate(config).model_dump(mode="json")
    )
    for stage in (filter_stage, pack_stage):
        stage(spec, 1, PROV)
    fix = "rerun the round from its generate stage"
    with pytest.raises(TrainingError, match=rf"round 1 sample \S+/\d: samples.token_l.*{fix}") as e:
        train_stage(spec, 1, PROV)
    assert "\n" not in str(e.value)


def test_a_default_run_stores_no_per_token_log_probs(tmp_path, tiny_world):
    spec = _round(tmp_path, tiny_world)
    q = """SELECT count(*) AS n, count(g.token_logprobs) AS gen,
                  count(s.teacher_token_logprobs) AS teacher, min(g.source) AS source
           FROM samples AS g JOIN scores AS s USING (run_id, round, prompt_id, sample_idx)"""
    assert spec.store.query(q).to_pylist() == [
        {"n": 8, "gen": 0, "teacher": 0, "source": "student"}
    ]


def test_is_mixed_takes_the_fraction_by_a_seeded_coin_per_sample():
    cfg = NPDConfig.model_validate({"data": {"mix": {"fraction": 0.3}}})
    picks = [is_mixed(cfg, 1, f"p{i}", k) for i in range(2000) for k in range(2)]
    assert 0.27 < np.mean(picks) < 0.33
    assert picks == [is_mixed(cfg, 1, f"p{i}", k) for i in range(2000) for k in range(2)]
    assert picks != [is_mixed(cfg, 2, f"p{i}", k) for i in range(2000) for k in range(2)]
    assert not any(is_mixed(NPDConfig(), 1, f"p{i}", 0) for i in range(100))


@pytest.mark.parametrize("source", ["teacher", "reference"])
def test_mixed_sequences_come_from_the_fixed_source_and_train(
    tmp_path, tiny_world, source, monkeypatch
):
    """data.mix 0.5: about half the round's sequences are the teacher's T = 1 samples (the same
    in round 2, taken from round 1's rows) or the reference answers, told apart by source in
    SQL, scored by the teacher, without generator log-probs, and trained with the rest; the
    student decodes only its own half, each sample as it would without the mix."""
    spec = _round(tmp_path, tiny_world, loss="sampled_reverse_kl")
    q = "SELECT prompt_id, sample_idx, response_token_ids FROM samples"
    unmixed = {(x["prompt_id"], x["sample_idx"]): x for x in spec.store.query(q).to_pylist()}
    mix = {"mix": {"fraction": 0.5, "source": source}}
    config = NPDConfig.model_validate({**spec.config, "data": {**spec.config["data"], **mix}})
    spec = dataclasses.replace(spec, config=config.model_dump(mode="json"))
    decoded, decode = [], stages.generate_with

    def counted(backend, ckpt, tok, ids, seeds, cfg, progress):
        decoded.extend(ids)
        return decode(backend, ckpt, tok, ids, seeds, cfg, progress)

    monkeypatch.setattr(stages, "generate_with", counted)
    for stage in (generate_stage, score_stage, filter_stage, pack_stage):
        stage(spec, 1, PROV)
    monkeypatch.undo()
    student = spec.store.query(q + " WHERE source = 'student'").to_pylist()
    assert len(decoded) == len(student)  # the student decodes only the pairs it keeps
    for x in student:  # and each the same as without the mix (its own seed)
        key = (x["prompt_id"], x["sample_idx"])
        assert x["response_token_ids"] == unmixed[key]["response_token_ids"]
    q = """SELECT g.source, count(*) AS n, count(g.token_logprobs) AS gen,
                  count(s.teacher_token_logprobs) AS scored
           FROM samples AS g JOIN scores AS s USING (run_id, round, prompt_id, sample_idx)
           GROUP BY ALL ORDER BY ALL"""
    rows = spec.store.query(q).to_pylist()
    assert [x["source"] for x in rows] == sorted(["student", source])
    mixed = next(x for x in rows if x["source"] == source)
    assert mixed["gen"] == 0 and mixed["scored"] == mixed["n"] and 0 < mixed["n"] < 8
    prompts = {p.id: p for p in read_prompts(spec.train_prompts)}
    out = spec.store.query(
        "SELECT prompt_id, sample_idx, response, response_token_ids, generator_checkpoint "
        f"FROM samples WHERE source = '{source}'"
    ).to_pylist()
    for x in out:
        if source == "reference":
            assert x["response"] == prompts[x["prompt_id"]].answer
        else:
            assert x["generator_checkpoint"] == rel_path(spec.root, spec.teacher)
    tr = train_stage(spec, 1, PROV).metrics
    assert tr.steps == 2 and math.isfinite(tr.mean_loss)
    if source == "teacher":
        _round_2_decodes_only_what_round_1_lacks(spec, prompts, out, monkeypatch)


def _round_2_decodes_only_what_round_1_lacks(spec, prompts, round_1, monkeypatch):
    """Round 2's teacher sequences for the prompts and sample indices that round 1 mixed in
    are round 1's rows, not decoded again; the others are decoded once, with the same seed
    whichever round asks (so a fresh decode of a round-1 pair gives its row too)."""
    first = {(x["prompt_id"], x["sample_idx"]): x["response_token_ids"] for x in round_1}
    tok = load_tokenizer(spec.teacher)
    ps = [prompts[key[0]] for key in first] + list(prompts.values())[:40]
    ps = list({p.id: p for p in ps}.values())
    ids = encode_prompts(tok, prompt_texts(tok, [p.prompt for p in ps], "auto"), "auto")
    decoded, decode = [], mix.generate

    def counted(model, prompts, **kw):
        decoded.extend(prompts)
        return decode(model, prompts, **kw)

    monkeypatch.setattr(mix, "generate", counted)
    again = mix.fixed_sequences(spec, 2, ps, ids, tok, 2)
    reused = [key for key in again if key in first]
    assert all(again[key].token_ids == first[key] for key in reused)
    assert len(decoded) == len(again) - len(reused) > 0
    monkeypatch.setattr(mix, "_earlier_teacher_samples", lambda spec, r: {})
    fresh = mix.fixed_sequences(spec, 1, ps, ids, tok, 2)
    assert all(fresh[key].token_ids == first[key] for key in first)
