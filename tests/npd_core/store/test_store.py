"""Store: atomic Parquet stages and the DuckDB views over them."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from npd_core.errors import StoreError, StoreUsageError
from npd_core.store import (
    CHECKPOINT_DERIVED,
    SCHEMA_VERSION,
    SCHEMAS,
    SCORE_COLUMNS,
    VIEWS,
    Shard,
    Store,
    empty_table,
    query,
    table_from_rows,
)
from npd_core.store import store as store_mod

NOW = datetime(2025, 1, 1, tzinfo=UTC)
KEY = ("run_id", "round", "prompt_id", "sample_idx")


def samples(run_id: str, round: int, n: int) -> pa.Table:
    rows = [
        {
            "run_id": run_id,
            "round": round,
            "prompt_id": f"p{i // 2}",
            "sample_idx": i % 2,
            "prompt": "1+1=",
            "response": "2",
            "prompt_token_ids": [1, 2, 3],
            "response_token_ids": [4],
            "generator_checkpoint": "ckpt/round=0",
            "backend": "hf",
            "temperature": 1.0,
            "top_p": 1.0,
            "seed": 7,
            "prompt_tokens": 3,
            "response_tokens": 1,
            "finished": True,
            "created_at": NOW,
        }
        for i in range(n)
    ]
    return table_from_rows("samples", rows)


def scores(table: pa.Table) -> pa.Table:
    """delta_ifd (and every score) = sample_idx, so the join is easy to check."""
    rows = []
    for r in table.to_pylist():
        values = {c: float(r["sample_idx"]) for c in SCORE_COLUMNS}
        rows.append({k: r[k] for k in KEY} | values | {"created_at": NOW})
    return table_from_rows("scores", rows)


def filters(table: pa.Table) -> pa.Table:
    """Keep sample 0 of each prompt."""
    rows = []
    for r in table.to_pylist():
        kept = r["sample_idx"] == 0
        reason = None if kept else "delta_ifd"
        rows.append(
            {k: r[k] for k in KEY} | {"kept": kept, "filter_reason": reason, "created_at": NOW}
        )
    return table_from_rows("filter", rows)


def write_round(store: Store, run_id: str, round: int, n: int) -> None:
    gen = samples(run_id, round, n)
    store.write_stage(run_id, round, "generate", {"samples": gen})
    store.write_stage(run_id, round, "score", {"scores": scores(gen)})
    store.write_stage(run_id, round, "filter", {"filter": filters(gen)})


def hidden_entries(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob(".*")
        if ".tmp-" in p.name or ".trash-" in p.name
    )


def test_new_store_has_empty_typed_views(tmp_path: Path) -> None:
    store = Store(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "npd-store.json").read_text()) == {
        "schema_version": SCHEMA_VERSION,
        "project": "npd",
    }
    for name in ("runs", "prompts", "rounds", "checkpoints", "evals", "scores"):
        result = store.query(f"SELECT * FROM {name}")
        assert result.num_rows == 0
        stored = result.select(SCHEMAS[name].names).schema
        assert stored.names == SCHEMAS[name].names and stored.types == SCHEMAS[name].types
        derived = CHECKPOINT_DERIVED if name == "checkpoints" else ()
        assert result.schema.names == [*SCHEMAS[name].names, *derived]
    result = store.query("SELECT * FROM samples")
    assert result.num_rows == 0
    joined = [
        *SCHEMAS["samples"].names,
        *SCORE_COLUMNS,
        "student_forward_kl_sum",
        *("kept", "filter_reason", "filter_rule", "filter_rule_params"),
    ]
    assert result.schema.names == joined
    assert result.schema.field("kept").type == pa.bool_()
    assert result.schema.field("response_token_ids").type == pa.list_(pa.int32())
    assert store.query("SELECT * FROM filtered").schema.names == result.schema.names
    assert store.query("SELECT schema_version FROM store_meta").to_pylist() == [
        {"schema_version": SCHEMA_VERSION}
    ]
    listed = store.query("SELECT view_name FROM duckdb_views() WHERE NOT internal")
    tables = store.query("SELECT table_name FROM duckdb_tables()")
    assert sorted(listed.column(0).to_pylist()) == sorted(VIEWS)
    assert tables.num_rows == 0  # the database holds only views


def test_samples_join_scores_and_filter(tmp_path: Path) -> None:
    store = Store(tmp_path)
    write_round(store, "r1", 0, 6)
    store.write_stage("r1", 1, "generate", {"samples": samples("r1", 1, 4)})  # not scored yet

    rows = store.query(
        "SELECT round, sample_idx, delta_ifd, kept, filter_reason FROM samples "
        "ORDER BY round, prompt_id, sample_idx"
    ).to_pylist()
    assert len(rows) == 10
    assert rows[:2] == [
        {"round": 0, "sample_idx": 0, "delta_ifd": 0.0, "kept": True, "filter_reason": None},
        {
            "round": 0,
            "sample_idx": 1,
            "delta_ifd": 1.0,
            "kept": False,
            "filter_reason": "delta_ifd",
        },
    ]
    assert all(r["kept"] is None and r["delta_ifd"] is None for r in rows if r["round"] == 1)

    kept = store.query("SELECT round, sample_idx, kept FROM filtered").to_pylist()
    assert len(kept) == 3
    assert all(r == {"round": 0, "sample_idx": 0, "kept": True} for r in kept)
    assert store.query("SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 6}]
    assert store.query(
        "SELECT count(*) AS n FROM samples WHERE run_id = ? AND round = ?", ["r1", 0]
    ).to_pylist() == [{"n": 6}]


def test_rewriting_a_stage_is_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path)
    table = samples("r1", 0, 4)
    path = store.write_stage("r1", 0, "generate", {"samples": table})
    first = (path / "samples.parquet").read_bytes()
    before = store.query("SELECT * FROM samples ORDER BY prompt_id, sample_idx")

    assert store.write_stage("r1", 0, "generate", {"samples": table}) == path
    assert (path / "samples.parquet").read_bytes() == first
    assert store.query("SELECT * FROM samples ORDER BY prompt_id, sample_idx").equals(before)
    assert os.listdir(path.parent) == ["generate"]
    assert hidden_entries(tmp_path) == []
    assert store.read_stage("r1", 0, "generate", "samples").equals(table)
    assert store.has_stage("r1", 0, "generate") and not store.has_stage("r1", 0, "score")
    # An in-flight temp dir (hidden name) is invisible to the views.
    shutil.copytree(path, path.parent / ".generate.tmp-inflight")
    assert store.query("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 4}]


def test_failed_cast_leaves_previous_stage(tmp_path: Path) -> None:
    store = Store(tmp_path)
    good = samples("r1", 0, 4)
    path = store.write_stage("r1", 0, "generate", {"samples": good})
    bad = good.set_column(
        good.schema.get_field_index("temperature"), "temperature", pa.array(["hot"] * 4)
    )
    with pytest.raises(StoreError, match="'temperature'.*cannot cast"):
        store.write_stage("r1", 0, "generate", {"extra": good, "samples": bad})
    assert sorted(os.listdir(path)) == ["samples.parquet"]
    assert store.read_stage("r1", 0, "generate", "samples").equals(good)
    assert hidden_entries(tmp_path) == []


def test_io_error_mid_write_removes_temp_dir(tmp_path: Path, monkeypatch) -> None:
    store = Store(tmp_path)
    good = samples("r1", 0, 4)
    store.write_stage("r1", 0, "generate", {"samples": good})
    real_write = store_mod._write_parquet
    calls = []

    def failing_write(fs, path: Path, table: pa.Table) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(fs, path, table)

    monkeypatch.setattr(store_mod, "_write_parquet", failing_write)
    with pytest.raises(OSError, match="disk full"):
        store.write_stage("r1", 0, "generate", {"samples": samples("r1", 0, 8), "b": good})
    assert store.query("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 4}]
    assert hidden_entries(tmp_path) == []
    # A new stage that fails leaves no visible folder at all.
    calls.clear()
    with pytest.raises(OSError):
        store.write_stage("r1", 0, "score", {"a": good, "b": good})
    assert not store.has_stage("r1", 0, "score")
    assert hidden_entries(tmp_path) == []


def test_rows_must_match_the_folder(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="round value.*\\[3\\].*round=0"):
        store.write_stage("r1", 0, "generate", {"samples": samples("r1", 3, 2)})
    with pytest.raises(StoreError, match="unknown stage 'gen'"):
        store.write_stage("r1", 0, "gen", {})
    with pytest.raises(StoreError, match="not a safe"):
        store.write_stage("../x", 0, "generate", {})
    assert not (tmp_path / "runs").exists()  # checked before anything touched the disk


def test_table_from_rows(tmp_path: Path) -> None:
    row = {"run_id": "r1", "prompt_id": "p0", "prompt": "1+1=", "split": "train"}
    table = table_from_rows("prompts", [row])
    assert table.schema == SCHEMAS["prompts"]
    assert table.column("answer").to_pylist() == [None]  # nullable key left out
    with pytest.raises(StoreError, match="unknown column.*colour"):
        table_from_rows("prompts", [{**row, "colour": "red"}])
    with pytest.raises(StoreError, match="'prompt'.*null value"):
        table_from_rows("prompts", [{k: v for k, v in row.items() if k != "prompt"}])
    assert empty_table("evals").num_rows == 0


def test_run_tables_share_a_folder(tmp_path: Path) -> None:
    store = Store(tmp_path)
    run = dict(run_id="r1", status="running", config_json="{}", config_hash="abc", created_at=NOW)
    store.write_run(run)
    prompts = table_from_rows(
        "prompts", [{"run_id": "r1", "prompt_id": "p0", "prompt": "q", "split": "eval"}]
    )
    store.write_stage("r1", None, "run", {"prompts": prompts})
    store.write_run({**run, "status": "done", "final_score": 91.5, "finished_at": NOW})
    assert store.query("SELECT run_id, status, final_score FROM runs").to_pylist() == [
        {"run_id": "r1", "status": "done", "final_score": 91.5}
    ]
    assert store.query("SELECT count(*) AS n FROM prompts").to_pylist() == [{"n": 1}]
    assert hidden_entries(tmp_path) == []


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO runs SELECT * FROM runs",
        "CREATE TABLE t AS SELECT 1",
        "COPY (SELECT 1) TO 'x.csv'",
        "SELECT 1; DROP VIEW runs",
    ],
)
def test_sql_is_read_only(tmp_path: Path, sql: str) -> None:
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="^npd sql is read-only: ") as info:
        query(store.db_path, sql)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.csv").exists()
    assert store.query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 0}]


def test_sql_errors_are_one_line(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="does not exist.*Views: checkpoints, evals, filtered"):
        store.query("SELECT * FROM sample")
    with pytest.raises(StoreError, match="^npd sql: Parser Error: syntax error") as info:
        store.query("SELEC 1")
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError, match="no npd database at .*missing.*npd demo"):
        query(tmp_path / "missing" / "npd.duckdb", "SELECT 1")


def test_moved_output_dir_still_queries(tmp_path: Path, monkeypatch) -> None:
    store = Store(tmp_path / "a")
    write_round(store, "r1", 0, 4)
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)
    monkeypatch.chdir(tmp_path)  # relative paths must not resolve against the working directory
    db_stat = os.stat(moved / "npd.duckdb")
    assert query(moved / "npd.duckdb", "SELECT count(*) AS n FROM filtered").to_pylist() == [
        {"n": 2}
    ]
    reopened = Store(moved)
    assert os.stat(moved / "npd.duckdb").st_mtime_ns == db_stat.st_mtime_ns  # views not rewritten
    assert reopened.query("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 4}]


def test_reader_sees_stages_written_while_it_is_open(tmp_path: Path) -> None:
    store = Store(tmp_path)
    write_round(store, "r1", 0, 4)
    with store.connect() as reader:
        assert reader.execute("SELECT count(*) FROM samples").fetchone() == (4,)
        write_round(store, "r1", 1, 6)  # the writer needs no lock on npd.duckdb
        assert query(store.db_path, "SELECT count(*) AS n FROM filtered").to_pylist() == [{"n": 5}]
        assert reader.execute("SELECT count(*) FROM samples").fetchone() == (10,)
        Store(tmp_path)  # reopening with an open reader does not need the database writable


def test_open_rules(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not an npd output directory.*choose an empty or npd"):
        Store(tmp_path / "other")
    with pytest.raises(StoreError, match="no npd store at .*nothing"):
        Store(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()

    root = tmp_path / "out"
    Store(root)
    (root / "npd.duckdb").unlink()
    with pytest.raises(StoreError, match="missing .*npd.duckdb"):
        Store(root, create=False)
    Store(root)  # recreates the views
    assert Store(root, create=False).query("SELECT count(*) AS n FROM samples").num_rows == 1

    (root / "npd-store.json").write_text(json.dumps({"schema_version": 99, "project": "npd"}))
    with pytest.raises(StoreError, match="npd-store.json was written by a newer npd.*upgrade npd"):
        Store(root)


def test_schema_version_in_database(tmp_path: Path) -> None:
    root = tmp_path / "out"
    Store(root)
    for version in (0, 99):
        (root / "npd.duckdb").unlink()
        with duckdb.connect(str(root / "npd.duckdb")) as con:
            con.execute(f"CREATE VIEW store_meta AS SELECT {version} AS schema_version")
        if version == 0:
            Store(root)  # an older store gets fresh views
            assert Store(root).query("SELECT count(*) AS n FROM filtered").num_rows == 1
        else:
            with pytest.raises(StoreError, match="npd.duckdb was written by a newer npd"):
                Store(root)


def test_a_store_of_schema_3_keeps_its_evaluations_as_the_default_eval_set(tmp_path: Path) -> None:
    """An output directory written before eval sets (schema 3: no eval_set column in evals or
    prompts) opens with its history, for readers too: every evaluation and eval prompt reads as
    the one default set, and the checkpoints view still scores and ranks the run's rounds."""
    import pyarrow.parquet as pq

    root = tmp_path / "out"
    store = Store(root)
    config = json.dumps({"eval": {"regression_margin": 3.0}})  # a config of schema 3: no sets
    store.write_run(
        dict(run_id="old", status="completed", config_json=config, config_hash="h", created_at=NOW)
    )
    for r, score in ((0, 10.0), (1, 30.0), (2, 20.0)):
        row = dict(run_id="old", round=r, checkpoint=f"c{r}", metric="exact_match", score=score)
        evals = table_from_rows("evals", [dict(row, n=4, created_at=NOW)])
        store.write_stage("old", r, "evaluate", {"evals": evals})
    prompts = [
        dict(run_id="old", prompt_id=f"{split}{i}", prompt="q", split=split)
        for split in ("train", "eval")
        for i in range(2)
    ]
    store.write_stage("old", None, "run", {"prompts": table_from_rows("prompts", prompts)})
    # what npd of schema 3 left: no eval_set column in any file, version 3 recorded
    for table in ("evals", "prompts"):
        for f in [*root.glob(f"runs/*/**/{table}.parquet"), root / f".npd/empty/{table}.parquet"]:
            pq.write_table(pq.read_table(f).drop_columns(["eval_set"]), f)
    (root / "npd-store.json").write_text(json.dumps({"schema_version": 3, "project": "npd"}))
    with duckdb.connect(str(root / "npd.duckdb")) as con:
        con.execute("CREATE OR REPLACE VIEW store_meta AS SELECT 3 AS schema_version")

    reopened = Store(root, create=False)  # as a reader opens it: `npd status`, `npd export`
    assert json.loads((root / "npd-store.json").read_text())["schema_version"] == SCHEMA_VERSION
    q = "SELECT round, eval_set, score FROM evals ORDER BY round"
    assert [tuple(x.values()) for x in reopened.query(q).to_pylist()] == [
        (0, "heldout", 10.0),
        (1, "heldout", 30.0),
        (2, "heldout", 20.0),
    ]
    q = "SELECT round, eval_set, score, is_best, regressed FROM checkpoints ORDER BY round"
    assert [tuple(x.values()) for x in reopened.query(q).to_pylist()] == [
        (0, "heldout", 10.0, False, None),
        (1, "heldout", 30.0, True, False),
        (2, "heldout", 20.0, False, True),
    ]
    q = "SELECT split, eval_set, count(*) AS n FROM prompts GROUP BY ALL ORDER BY split"
    assert reopened.query(q).to_pylist() == [
        {"split": "eval", "eval_set": "heldout", "n": 2},
        {"split": "train", "eval_set": None, "n": 2},
    ]


def test_a_sharded_stage_is_visible_once_every_shard_is_in(tmp_path: Path) -> None:
    """Shards go to a hidden folder that readers and the views never see; the commit refuses
    while a shard is missing, then makes all of them visible in one rename; reads give the
    shards in order, or one of them; a retried commit after the rename changes nothing, and a
    sweep keeps the shards of an uncommitted stage (a retry reruns only the missing ones)."""
    store = Store(tmp_path)
    gen = samples("r", 1, 10)
    halves = [gen.slice(Shard(k, 2).rows(10).start, 5) for k in range(2)]
    store.write_shard("r", 1, "generate", Shard(0, 2), {"samples": halves[0]})
    with pytest.raises(StoreError, match=r"samples-00001-of-00002.parquet missing"):
        store.commit_shards("r", 1, "generate", ["samples"], 2)
    assert store.sweep("r") == [] and not store.has_stage("r", 1, "generate")
    assert store.query("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 0}]
    store.write_shard("r", 1, "generate", Shard(1, 2), {"samples": halves[1]})
    final = store.commit_shards("r", 1, "generate", ["samples"], 2)
    assert sorted(p.name for p in final.iterdir()) == [
        "samples-00000-of-00002.parquet",
        "samples-00001-of-00002.parquet",
    ]
    assert store.read_stage("r", 1, "generate", "samples").equals(gen)
    assert store.read_stage("r", 1, "generate", "samples", Shard(1, 2)).equals(halves[1])
    assert store.query("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 10}]
    assert store.commit_shards("r", 1, "generate", ["samples"], 2) == final
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".")] == []
    assert [Shard(k, 3).rows(10) for k in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 10)]


def test_a_store_of_schema_4_opens_and_reads_sharded_stages(tmp_path: Path) -> None:
    """Schema 5 only widens the samples and scores views to shard files: a store npd of schema
    4 wrote opens with its rows, and the sharded rounds written after it show up beside them."""
    root = tmp_path / "out"
    store = Store(root)
    write_round(store, "old", 1, 4)
    (root / "npd-store.json").write_text(json.dumps({"schema_version": 4, "project": "npd"}))
    with duckdb.connect(str(root / "npd.duckdb")) as con:
        con.execute("CREATE OR REPLACE VIEW store_meta AS SELECT 4 AS schema_version")
    reopened = Store(root, create=False)
    assert json.loads((root / "npd-store.json").read_text())["schema_version"] == SCHEMA_VERSION
    gen = samples("new", 1, 4)
    for k in range(2):
        part = gen.slice(2 * k, 2)
        reopened.write_shard("new", 1, "generate", Shard(k, 2), {"samples": part})
        reopened.write_shard("new", 1, "score", Shard(k, 2), {"scores": scores(part)})
    for stage, name in (("generate", "samples"), ("score", "scores")):
        reopened.commit_shards("new", 1, stage, [name], 2)
    q = "SELECT run_id, count(delta_ifd) AS n FROM samples GROUP BY run_id ORDER BY run_id"
    assert reopened.query(q).to_pylist() == [{"run_id": "new", "n": 4}, {"run_id": "old", "n": 4}]


def test_a_store_of_schema_5_reads_its_samples_as_the_students(tmp_path: Path) -> None:
    """Schema 6 adds samples.source and the per-token log-probs (samples.token_logprobs,
    scores.teacher_token_logprobs): a store npd of schema 5 wrote (files without them) opens
    with its rows, which read as the student's samples with no per-token log-probs, beside a
    round written after it whose mixed-in teacher samples SQL tells apart."""
    import pyarrow.parquet as pq

    root = tmp_path / "out"
    store = Store(root)
    write_round(store, "old", 1, 4)
    new_columns = {"samples": ["source", "token_logprobs"], "scores": ["teacher_token_logprobs"]}
    for table, columns in new_columns.items():
        for f in [*root.glob(f"runs/*/**/{table}.parquet"), root / f".npd/empty/{table}.parquet"]:
            pq.write_table(pq.read_table(f).drop_columns(columns), f)
    (root / "npd-store.json").write_text(json.dumps({"schema_version": 5, "project": "npd"}))
    with duckdb.connect(str(root / "npd.duckdb")) as con:
        con.execute("CREATE OR REPLACE VIEW store_meta AS SELECT 5 AS schema_version")
    reopened = Store(root, create=False)
    assert json.loads((root / "npd-store.json").read_text())["schema_version"] == SCHEMA_VERSION
    rows = samples("new", 1, 4).to_pylist()
    for i, row in enumerate(rows):
        row.update(source="teacher" if i % 2 else "student", token_logprobs=[-0.5 * i])
    gen = table_from_rows("samples", rows)
    reopened.write_stage("new", 1, "generate", {"samples": gen})
    reopened.write_stage("new", 1, "score", {"scores": scores(gen)})
    q = """SELECT run_id, source, count(*) AS n, count(token_logprobs) AS with_logprobs,
                  count(delta_ifd) AS scored
           FROM samples GROUP BY ALL ORDER BY ALL"""
    assert reopened.query(q).to_pylist() == [
        {"run_id": "new", "source": "student", "n": 2, "with_logprobs": 2, "scored": 2},
        {"run_id": "new", "source": "teacher", "n": 2, "with_logprobs": 2, "scored": 2},
        {"run_id": "old", "source": "student", "n": 4, "with_logprobs": 0, "scored": 4},
    ]
    q = "SELECT count(*) AS n, count(teacher_token_logprobs) AS t FROM scores"
    assert reopened.query(q).to_pylist() == [{"n": 8, "t": 0}]


def test_a_store_of_schema_6_opens_and_takes_step_weights(tmp_path: Path) -> None:
    """Schema 7 adds the step_weights table (each sample's learner ratio and weight per train
    step): a store npd of schema 6 wrote (no such placeholder, no such view) opens with its
    rows and an empty typed step_weights view, and a train stage written after it reads back
    there, a fixed source's ratio null."""
    root = tmp_path / "out"
    store = Store(root)
    write_round(store, "old", 1, 4)
    (root / ".npd/empty/step_weights.parquet").unlink()
    (root / "npd-store.json").write_text(json.dumps({"schema_version": 6, "project": "npd"}))
    with duckdb.connect(str(root / "npd.duckdb")) as con:
        con.execute("DROP VIEW step_weights")
        con.execute("CREATE OR REPLACE VIEW store_meta AS SELECT 6 AS schema_version")
    reopened = Store(root, create=False)
    assert json.loads((root / "npd-store.json").read_text())["schema_version"] == SCHEMA_VERSION
    empty = reopened.query("SELECT * FROM step_weights")
    assert empty.num_rows == 0 and empty.schema.names == SCHEMAS["step_weights"].names
    assert reopened.query("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 4}]
    rows = [
        dict(run_id="old", round=1, step=s, prompt_id="p0", sample_idx=k, ratio=ratio,
             weight=weight, created_at=NOW)
        for s in (7, 8)
        for k, ratio, weight in ((0, 0.5, 0.0), (1, None, 1.0))
    ]  # fmt: skip
    reopened.write_stage("old", 1, "train", {"step_weights": table_from_rows("step_weights", rows)})
    q = """SELECT w.step, w.sample_idx, w.ratio, w.weight, g.response
           FROM step_weights AS w JOIN samples AS g USING (run_id, round, prompt_id, sample_idx)
           ORDER BY ALL"""
    assert [tuple(x.values()) for x in reopened.query(q).to_pylist()] == [
        (7, 0, 0.5, 0.0, "2"),
        (7, 1, None, 1.0, "2"),
        (8, 0, 0.5, 0.0, "2"),
        (8, 1, None, 1.0, "2"),
    ]


def test_parquet_goes_through_the_stores_filesystem(tmp_path: Path, monkeypatch) -> None:
    """The store on a file:// URL is the store on the path; every Parquet file a stage writes
    or reads is opened through its fsspec filesystem; a filesystem without folder renames
    (object storage, here fsspec's memory://) is refused in one line."""
    from fsspec.implementations.local import LocalFileSystem

    opened: list[str] = []

    class Recording(LocalFileSystem):
        def _open(self, path, mode="rb", **kw):
            name = re.sub(r"^\.(.+)\.tmp-[0-9a-f]+$", r"\1", Path(path).name)  # atomic_file's
            opened.append(f"{mode[0]} {name}")
            return super()._open(path, mode, **kw)

    store = Store(f"file://{tmp_path}")
    assert store.root == tmp_path.resolve() and isinstance(store.fs, LocalFileSystem)
    monkeypatch.setattr(store, "fs", Recording())
    gen = samples("r", 1, 4)
    store.write_stage("r", 1, "generate", {"samples": gen})
    store.write_shard("r", 1, "score", Shard(0, 1), {"scores": scores(gen)})
    store.commit_shards("r", 1, "score", ["scores"], 1)
    assert store.read_stage("r", 1, "generate", "samples").equals(gen)
    assert store.read_stage("r", 1, "score", "scores").num_rows == 4
    assert [x for x in opened if x.startswith("w")] == [
        "w samples.parquet",
        "w scores-00000-of-00001.parquet",
    ]
    assert {"r samples.parquet", "r scores-00000-of-00001.parquet"} <= set(opened)
    assert Store(tmp_path).query("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 4}]
    with pytest.raises(StoreUsageError) as e:
        Store("memory://npd-out")
    assert "memory:// storage cannot do" in str(e.value) and "\n" not in str(e.value)
