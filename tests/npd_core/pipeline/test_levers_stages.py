"""The stages behind the sampled-token loss, without Prefect: with ``train.loss:
sampled_reverse_kl`` the generate stage stores the generator's log-prob of each sampled token
and the score stage the teacher's, each summing to the row's stored sum; the train stage trains
on them; by default neither is stored (the tables of a default run are as before)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from npd_core.config import NPDConfig
from npd_core.pipeline.spec import RunSpec
from npd_core.pipeline.stages import (
    filter_stage,
    generate_stage,
    pack_stage,
    score_stage,
    train_stage,
)
from npd_core.store import Store

PROV = {"flow_run_id": "f", "task_run_id": "t"}


def _round(tmp_path, world, **train) -> RunSpec:
    """Round 1 generated and scored, with ``train`` settings."""
    Store(tmp_path)
    c = NPDConfig.model_validate(
        dict(
            rounds=1,
            models={"bf16": False},
            data={"prompts_per_round": 8},
            generate={"max_new_tokens": 24},
            filter={"rule": "none", "drop_unfinished": False},
            train={"steps_per_round": 2, "rows_per_step": 2, **train},
            pack={"max_seq_len": 128},
        )
    )
    spec = RunSpec(
        str(tmp_path),
        "r",
        c.model_dump(mode="json"),
        str(world.teacher),
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


def test_a_default_run_stores_no_per_token_log_probs(tmp_path, tiny_world):
    spec = _round(tmp_path, tiny_world)
    q = """SELECT count(*) AS n, count(g.token_logprobs) AS gen,
                  count(s.teacher_token_logprobs) AS teacher, min(g.source) AS source
           FROM samples AS g JOIN scores AS s USING (run_id, round, prompt_id, sample_idx)"""
    assert spec.store.query(q).to_pylist() == [
        {"n": 8, "gen": 0, "teacher": 0, "source": "student"}
    ]
