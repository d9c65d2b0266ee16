"""A round's generate and score stages in K shards (``orchestration.shards``), without Prefect:
for K = 1, 2, 4 in float32 the samples are identical (token ids, text, seeds, kept, reasons),
so are the scores (scoring attends per sequence: ``kernels.PER_SEQUENCE_SCORING``; the issue
asks 1e-5), and the generator's log-prob sums agree within 1e-6 relative; a sharded stage is
invisible until its commit."""

from __future__ import annotations

import numpy as np
import pytest

from npd_core.config import NPDConfig
from npd_core.pipeline.kernels import choose_attention
from npd_core.pipeline.spec import RunSpec
from npd_core.pipeline.stages import commit_stage, filter_stage, generate_stage, score_stage
from npd_core.store import SCORE_COLUMNS, Shard, Store, query

PROV = {"flow_run_id": "f", "task_run_id": "t"}
KEY = "ORDER BY prompt_id, sample_idx"
# Compared exactly: every column but the scores (of scores, below), the generator's own log-prob
# sum (float32 sums over a sample's tokens: the batch a sample decodes in moves its last bits)
# and the provenance
FLOATS = (*SCORE_COLUMNS, "student_forward_kl_sum", "sample_logprob_sum")
SAMPLES = f"SELECT * EXCLUDE (created_at, task_run_id, flow_run_id, {', '.join(FLOATS)})"
SAMPLES += f" FROM samples {KEY}"
LOGPROBS = f"SELECT sample_logprob_sum FROM samples {KEY}"
SCORES = f"SELECT * EXCLUDE (created_at, task_run_id, flow_run_id) FROM scores {KEY}"


def _round(root, world, shards: int) -> RunSpec:
    """Round 1 generated, scored (every view) and filtered with the Δ-IFD band, in ``shards``."""
    Store(root)
    cfg = NPDConfig.model_validate(
        dict(
            rounds=1,
            threads=1,
            models={"bf16": False},
            data={"prompts_per_round": 12},
            generate={"max_new_tokens": 24, "n_per_prompt": 2},
            filter={"rule": "band", "drop_unfinished": True},
            orchestration={"shards": shards},
        )
    )
    spec = RunSpec(
        str(root),
        "r",
        cfg.model_dump(mode="json"),
        str(world.teacher),
        str(world.student),
        str(world.train_prompts),
        str(world.eval_prompts),
    )
    spec = choose_attention(spec, log=lambda m: None)  # as a run does (NPD_ATTENTION=fixed)
    assert spec.kernel("score_teacher") == spec.kernel("score_student") == "sdpa_varlen"
    for stage in (generate_stage, score_stage):
        if shards == 1:
            stage(spec, 1, PROV)
            continue
        parts = [stage(spec, 1, PROV, shard=Shard(k, shards)).to_dict() for k in range(shards)]
        name = parts[0]["stage"]
        assert not spec.store.has_stage("r", 1, name)  # readers see no partial round
        res = commit_stage(spec, 1, name, parts)
        assert len(res.metrics.shard_seconds) == shards
        if name == "generate":
            assert res.metrics.n_generated == 24 == sum(p["metrics"]["n_generated"] for p in parts)
    filter_stage(spec, 1, PROV)
    return spec


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, tiny_world) -> dict[int, RunSpec]:
    return {k: _round(tmp_path_factory.mktemp(f"k{k}"), tiny_world, k) for k in (1, 2, 4)}


@pytest.mark.parametrize("shards", [2, 4])
def test_samples_are_identical_and_scores_agree_for_any_shard_count(rounds, shards):
    one, many = rounds[1].store, rounds[shards].store
    ref = query(one.db_path, SAMPLES)
    assert ref.num_rows == 24 and query(many.db_path, SAMPLES).equals(ref)
    kept = query(one.db_path, "SELECT count(*) FILTER (kept) AS k FROM samples").column(0)
    assert 0 < kept[0].as_py() < 24  # the band dropped some: kept and reasons are compared
    x, y = (query(db, LOGPROBS).column(0).to_numpy() for db in (one.db_path, many.db_path))
    np.testing.assert_allclose(y, x, rtol=1e-6)  # measured: ≤ 1.5e-5 on sums near -130
    a, b = query(one.db_path, SCORES), query(many.db_path, SCORES)
    assert a.column_names == b.column_names
    for name in a.column_names:  # every score the same float32 value: no tolerance needed
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name in (*SCORE_COLUMNS, "student_forward_kl_sum", "topk_logprobs"):
            np.testing.assert_array_equal(_flat(y), _flat(x), err_msg=name)
        else:
            assert x == y, name
    files = sorted(p.name for p in (many.stage_path("r", 1, "score")).iterdir())
    assert files == [Shard(k, shards).file("scores") for k in range(shards)]


def _flat(rows: list) -> np.ndarray:
    """A column's values as one float array (top-k log-probs: each row's (positions, k) flat)."""
    return np.concatenate([np.ravel(np.array(v, float)) for v in rows])
