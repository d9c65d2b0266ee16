"""Planted junk inside a run (``generate.plant_junk``): which rows, of which kind, and what the
generate stage stores for them; the rows are then filtered and weighed like the student's."""

from __future__ import annotations

import os

import numpy as np
import pytest

from npd_core.bench import filter_trained as ft
from npd_core.config import NPDConfig
from npd_core.data import Prompt
from npd_core.method.score import score
from npd_core.models import load_model
from npd_core.pipeline.mix import is_mixed
from npd_core.pipeline.plant import junk_plan
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
CAP = 24


def test_the_plan_takes_the_share_in_equal_kinds_by_seed_and_round():
    cfg = NPDConfig.model_validate({"generate": {"plant_junk": 0.15, "n_per_prompt": 2}})
    prompts = [Prompt(f"p{i}", "x") for i in range(100)]
    plan = junk_plan(cfg, 3, prompts)
    kinds = list(plan.values())
    assert len(plan) == 30 and kinds.count("stale") == 15 and kinds.count("loop") == 15
    assert junk_plan(cfg, 3, prompts) == plan  # a retry plants the same
    assert junk_plan(cfg, 3, prompts[::-1]) == plan  # whatever the order (or shard) of prompts
    assert set(junk_plan(cfg, 4, prompts)) != set(plan)  # another round, other rows
    other = NPDConfig.model_validate({**cfg.model_dump(), "seed": 1})
    assert set(junk_plan(other, 3, prompts)) != set(plan)
    assert junk_plan(NPDConfig(), 3, prompts) == {}  # the default plants nothing
    one = NPDConfig.model_validate({"generate": {"plant_junk": 0.01}})
    assert list(junk_plan(one, 3, prompts).values()) == ["loop"]  # an odd count: one loop more
    mixed = NPDConfig.model_validate({**cfg.model_dump(), "data": {"mix": {"fraction": 0.5}}})
    assert not any(is_mixed(mixed, 3, p, k) for p, k in junk_plan(mixed, 3, prompts))


@pytest.fixture
def planted(tmp_path, tiny_world):
    """Round 2 of a run at staleness 0 whose θ_1 is the tiny world's teacher (so the round's
    generator is not θ₀), half its 8 samples planted, under a learner_ratio fence."""
    Store(tmp_path)
    c = NPDConfig.model_validate(
        dict(
            rounds=2,
            staleness=0,
            models={"bf16": False},
            data={"prompts_per_round": 8},
            generate={"max_new_tokens": CAP, "plant_junk": 0.5},
            filter={"rule": "fence", "score": "learner_ratio", "k": 3.0},
            train={"steps_per_round": 1, "rows_per_step": 4},
            pack={"max_seq_len": 128},
        )
    )
    w = tiny_world
    spec = RunSpec(
        str(tmp_path), "r", c.model_dump(mode="json"), str(w.teacher), str(w.student),
        str(w.train_prompts), str(w.eval_prompts),
    )  # fmt: skip
    theta1 = spec.checkpoint(1)
    os.makedirs(os.path.dirname(theta1))
    os.symlink(w.teacher, theta1)
    first = generate_stage(spec, 2, PROV)
    return spec, first


def test_junk_rows_carry_their_kind_and_their_generator(planted):
    spec, first = planted
    rows = spec.store.query(
        "SELECT * FROM samples ORDER BY prompt_id, sample_idx"
    ).to_pylist()  # fmt: skip
    by = {s: [x for x in rows if x["source"] == s] for s in ("student", "junk-stale", "junk-loop")}
    assert [len(by[s]) for s in by] == [4, 2, 2]
    for x in rows:  # every row keeps its generator's per-token log-probs, summing to the sum
        assert np.sum(x["token_logprobs"]) == pytest.approx(x["sample_logprob_sum"], abs=1e-3)
    theta0 = load_model(spec.student)
    teacher = load_model(spec.teacher)
    for x in by["junk-stale"]:  # θ₀'s sample, θ₀'s log-probs
        assert x["generator_checkpoint"] == rel_path(spec.root, spec.student)
        got = score(theta0, [x["prompt_token_ids"]], [x["response_token_ids"]], view=None,
                    top_k=None, batch_tokens=4096, bf16=False).token_logprobs[0]  # fmt: skip
        assert got == pytest.approx(np.array(x["token_logprobs"]), abs=1e-4)
    for x in by["junk-loop"]:  # unfinished at the cap, the round's generator's log-probs
        assert not x["finished"] and x["response_tokens"] == CAP
        got = score(teacher, [x["prompt_token_ids"]], [x["response_token_ids"]], view=None,
                    top_k=None, batch_tokens=4096, bf16=False).token_logprobs[0]  # fmt: skip
        assert got == pytest.approx(np.array(x["token_logprobs"]), abs=1e-4)
    for x in by["student"]:
        assert x["generator_checkpoint"] == rel_path(spec.root, spec.checkpoint(1))
    assert generate_stage(spec, 2, PROV).digest == first.digest  # a retry plants the same junk
    # the junk is no fixed source: the train step weighs it by its finite learner ratio
    for stage in (score_stage, filter_stage, pack_stage, train_stage):
        stage(spec, 2, PROV)
    q = """SELECT g.source, count(*) AS n, count(w.ratio) AS ratios
           FROM step_weights AS w JOIN samples AS g USING (run_id, round, prompt_id, sample_idx)
           GROUP BY ALL ORDER BY ALL"""
    got = {x["source"]: x for x in spec.store.query(q).to_pylist()}
    assert set(got) == {"junk-loop", "junk-stale", "student"}
    assert all(x["ratios"] == x["n"] for x in got.values())
    # what the filter study's random drop copies: the share kept by the filter stage (all), or
    # for a rule in the train step, of the round's sample-steps weighing more than 0
    assert ft.kept_stats(spec.root, "r", in_steps=False) == {
        "kept_by_round": {2: 1.0}, "kept_share": 1.0, "junk_kept_share": 1.0
    }  # fmt: skip
    q = "SELECT avg((weight > 0)::INT) AS kept FROM step_weights"
    kept = spec.store.query(q).to_pylist()[0]["kept"]
    steps = ft.kept_stats(spec.root, "r", in_steps=True)
    assert steps["kept_by_round"] == {2: pytest.approx(kept)} and steps["kept_share"] == kept
