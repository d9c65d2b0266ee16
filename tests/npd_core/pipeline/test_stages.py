"""Stages without Prefect: idempotent writes, and a round whose samples are all filtered out."""

from __future__ import annotations

import pyarrow as pa

from npd_core.config import NPDConfig
from npd_core.pipeline.stages import (
    RunSpec,
    filter_stage,
    generate_stage,
    pack_stage,
    score_stage,
    train_stage,
)
from npd_core.store import Store, query

PROV = {"flow_run_id": "f", "task_run_id": "t"}


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


def test_everything_filtered_trains_nothing_and_goes_on(tmp_path, tiny_world):
    spec = _spec(tmp_path, tiny_world, filter={"abs_low": 100.0, "abs_high": 200.0})
    for stage in (generate_stage, score_stage, filter_stage):
        stage(spec, 1, PROV)
    flt = filter_stage(spec, 1, PROV)
    assert flt.metrics["n_kept"] == 0
    assert set(flt.metrics["drop_reasons"]) <= {"below_band", "unfinished", "empty", "non_finite"}
    assert pack_stage(spec, 1, PROV).metrics["rows"] == 0
    tr = train_stage(spec, 1, PROV)
    assert tr.metrics["steps"] == 0 and tr.metrics["train_tokens"] == 0
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
    assert flt.metrics["n_kept"] == 0 and flt.metrics["drop_reasons"] == {"empty": n}
    assert pack_stage(spec, 1, PROV).metrics["rows"] == 0
    assert train_stage(spec, 1, PROV).metrics["steps"] == 0
