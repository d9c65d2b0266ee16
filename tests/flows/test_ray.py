"""Generation and scoring sharded over Ray: ``orchestration: {task_runner: ray, shards: 2}`` runs
a round's shard tasks on a local 2-worker Ray cluster through prefect-ray. The samples are those
of the same round in one shard, the scores agree within 1e-5, and a shard that fails is retried
alone: the flow run after the failure gets the other shard back Cached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from resume_checks import stage_counts

from npd_core.config import NPDConfig
from npd_core.pipeline.kernels import choose_attention
from npd_core.pipeline.spec import RunSpec
from npd_core.pipeline.stages import filter_stage, generate_stage, score_stage
from npd_core.store import SCORE_COLUMNS, Store, query

ray = pytest.importorskip("ray", reason="needs the ray extra: make ray")
pytest.importorskip("prefect_ray", reason="needs the ray extra: make ray")

CFG = dict(
    rounds=1,
    threads=1,
    models={"bf16": False},
    data={"prompts_per_round": 12, "eval_size": 8},
    generate={"max_new_tokens": 24, "n_per_prompt": 2},
    train={"steps_per_round": 2, "rows_per_step": 2},
    pack={"max_seq_len": 128},
    eval={"batch_size": 64},
    filter={"rule": "band", "drop_unfinished": True},
)
FAIL_AT = "generate-shard1:1"  # shard 1 of round 1's generation fails once
VOLATILE = "created_at, task_run_id, flow_run_id"
FLOATS = (*SCORE_COLUMNS, "student_forward_kl_sum", "sample_logprob_sum")  # within tolerances
SAMPLES = f"SELECT * EXCLUDE ({VOLATILE}, {', '.join(FLOATS)})"
SAMPLES += " FROM samples ORDER BY prompt_id, sample_idx"
LOGPROBS = "SELECT sample_logprob_sum FROM samples ORDER BY prompt_id, sample_idx"
SCORES = f"SELECT * EXCLUDE ({VOLATILE}, run_id) FROM scores ORDER BY prompt_id, sample_idx"


@pytest.fixture(scope="module")
def cluster(prefect_server) -> Iterator[None]:
    """One local Ray cluster for the module, 2 CPUs (a Ray start costs seconds); prefect-ray
    joins it instead of starting one of its own. Its workers, which run the stage bodies, count
    each body's runs and fail at ``FAIL_AT`` once per run (tasks/faults.py); they inherit the
    environment of this process as it is at the start (the test server's result storage)."""
    env = {"NPD_COUNT_STAGES": "1", "NPD_FAIL_AT": FAIL_AT}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def _spec(root, world, run_id: str, **orchestration) -> RunSpec:
    Store(root)
    cfg = NPDConfig.model_validate({**CFG, "orchestration": orchestration})
    return RunSpec(
        str(root),
        run_id,
        cfg.model_dump(mode="json"),
        str(world.teacher),
        str(world.student),
        str(world.train_prompts),
        str(world.eval_prompts),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_world, prefect_api, cluster) -> dict:
    """Round 1's tables made in one shard by the stages themselves, and the 2-shard run on Ray:
    its first flow run fails at ``FAIL_AT``, the second (as ``npd retry`` makes) completes.
    Returns both specs and, per task of the Ray run, its state in each flow run."""
    from flows.distill import distill_flow

    one = _spec(tmp_path_factory.mktemp("one"), tiny_world, "one")
    one = choose_attention(one, log=lambda m: None)  # the kernels the flow run chooses
    for stage in (generate_stage, score_stage, filter_stage):
        stage(one, 1, {"flow_run_id": "f", "task_run_id": "t"})
    two = _spec(tmp_path_factory.mktemp("two"), tiny_world, "two", task_runner="ray", shards=2)
    with pytest.raises(Exception, match="generate-shard1"):
        distill_flow(two)
    res = distill_flow(two)
    flows = prefect_api.post("/flow_runs/filter", {"flow_runs": {"name": {"any_": ["two"]}}})
    order = {f["id"]: f["start_time"] for f in flows.json()}
    body = {"flow_runs": {"id": {"any_": list(order)}}, "limit": 200}
    states: dict[str, list[tuple[str, str]]] = {}
    for t in prefect_api.post("/task_runs/filter", body).json():
        states.setdefault(t["name"], []).append((order[t["flow_run_id"]], t["state"]["name"]))
    states = {name: [s for _, s in sorted(v)] for name, v in states.items()}
    return {"one": one, "two": two, "states": states, "res": res}


def test_a_failed_shard_is_retried_alone(runs):
    states, two = runs["states"], runs["two"]
    assert states["r1-generate-shard1"] == ["Failed", "Completed"]
    assert states["r1-generate-shard0"] == ["Completed", "Cached"]
    assert states["r1-score-shard0"] == states["r1-score-shard1"] == ["Completed"]
    counts = stage_counts(Path(two.root), "two")
    assert counts[("generate-shard0", 1)] == 1 and counts[("generate-shard1", 1)] == 2
    assert counts[("generate", 1)] == 1  # the commit: the stage became visible once
    assert runs["res"].final_score is not None


def test_two_ray_shards_store_the_tables_of_one_shard(runs):
    one, two = runs["one"].store, runs["two"].store
    ref = query(one.db_path, SAMPLES).drop_columns(["run_id"])
    assert ref.num_rows == 24 and query(two.db_path, SAMPLES).drop_columns(["run_id"]).equals(ref)
    x, y = (query(db, LOGPROBS).column(0).to_numpy() for db in (one.db_path, two.db_path))
    np.testing.assert_allclose(y, x, rtol=1e-6)
    a, b = query(one.db_path, SCORES), query(two.db_path, SCORES)
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name in (*SCORE_COLUMNS, "student_forward_kl_sum", "topk_logprobs"):
            np.testing.assert_allclose(_flat(y), _flat(x), rtol=0, atol=1e-5)
        else:
            assert x == y, name


def _flat(rows: list) -> np.ndarray:
    """A column's values as one float array (top-k log-probs: each row's (positions, k) flat)."""
    return np.concatenate([np.ravel(np.array(v, float)) for v in rows])


def test_scale_bench_shards_on_ray(tmp_path, tiny_world, cluster):
    """`npd bench scale`'s shard half (npd_core/bench/scale.py) on the module's cluster: round 1
    generated and scored in K = 1 and 2 shards; the seconds add up, the speedup is their ratio,
    the samples are identical and the scores agree."""
    from npd_core.bench.scale import shard_arms

    base = choose_attention(_spec(tmp_path, tiny_world, "scale"), log=lambda m: None)
    res = shard_arms(base, (1, 2), log=lambda m: None)
    assert res["ray_cluster"] == "joined" and res["ray_start_s"] is None  # the module's
    assert res["workers_start_s"] > 0
    assert [a["k"] for a in res["arms"]] == [1, 2]
    for arm in res["arms"]:
        gen, sc = arm["generate"], arm["score"]
        assert arm["seconds"] == gen["seconds"] + sc["seconds"] and gen["seconds"] > 0
        assert arm["dispatch_s"] == gen["dispatch_s"] + sc["dispatch_s"] >= 0
        assert len(gen["shard_seconds"]) == len(sc["shard_seconds"]) == arm["k"]
    assert res["speedup"] == res["arms"][0]["seconds"] / res["arms"][1]["seconds"]
    assert res["samples"] == 24 and res["samples_identical"] and res["scores_agree"]
    assert res["scores_max_abs_diff"] <= res["tolerance"] == 1e-5
