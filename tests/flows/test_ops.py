"""Operating npd: best checkpoint and regressions, export, nightly continuation, `npd ui`,
served deployments, and the scale-out switch (producer/consumer chains on two work pools)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from npd_core.config import NPDConfig
from npd_core.errors import StoreUsageError
from npd_core.store import Store, query, table_from_rows

runner = CliRunner()
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _store_with_rounds(root: Path, world, scores: list[float], margin: float = 2.0) -> Store:
    """A completed run 'a' whose round r scored scores[r]; θ_r is a copy of the tiny student
    (round 1: the teacher, so exports can tell checkpoints apart)."""
    store = Store(root)
    cfg = NPDConfig(eval={"regression_margin": margin}).model_dump(mode="json")
    store.write_run(
        dict(
            run_id="a",
            status="completed",
            config_json=json.dumps(cfg),
            config_hash="h",
            created_at=NOW,
        )
    )
    for r, score in enumerate(scores):
        ckpt = world.student if r == 0 else root / "runs" / "a" / "checkpoints" / f"round={r}"
        if r:
            shutil.copytree(world.teacher if r == 1 else world.student, ckpt)
            row = dict(
                run_id="a",
                round=r,
                path=str(ckpt.relative_to(root)),
                step=3 * r,
                train_tokens=100 * r,
                created_at=NOW,
            )
            store.write_stage(
                "a", r, "train", {"checkpoints": table_from_rows("checkpoints", [row])}
            )
        row = dict(
            run_id="a",
            round=r,
            checkpoint=str(ckpt),
            metric="exact_match",
            score=score,
            n=64,
            created_at=NOW,
        )
        store.write_stage("a", r, "evaluate", {"evals": table_from_rows("evals", [row])})
    return store


def test_checkpoints_view_marks_best_and_flags_regressions(tmp_path, tiny_world):
    store = _store_with_rounds(tmp_path, tiny_world, [10.0, 40.0, 38.5, 30.0, 40.0])
    rows = store.query(
        "select round, step, score, best_before, is_best, regressed from checkpoints order by round"
    ).to_pylist()
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]  # θ_0 is listed too
    assert [r["is_best"] for r in rows] == [False, False, False, False, True]  # tie → later round
    assert [r["best_before"] for r in rows] == [None, 10.0, 40.0, 40.0, 40.0]
    # 38.5 is within the 2-point margin of 40; 30 is not
    assert [r["regressed"] for r in rows] == [None, False, False, True, False]
    # a train shard of store schema 1 (with the score/is_best placeholders) still reads
    old = store.root / "runs" / "old" / "round=1" / "train"
    old.mkdir(parents=True)
    legacy = table_from_rows(
        "checkpoints",
        [dict(run_id="old", round=1, path="p", step=1, train_tokens=1, created_at=NOW)],
    )
    legacy = legacy.append_column("score", pa.array([None], pa.float64()))
    pq.write_table(legacy.append_column("is_best", pa.array([False])), old / "checkpoints.parquet")
    old_rows = store.query("select round, is_best from checkpoints where run_id = 'old'")
    assert old_rows.to_pylist() == [{"round": 1, "is_best": False}]  # not evaluated: not best


def test_status_shows_best_and_regressed_rounds(tmp_path, tiny_world):
    _store_with_rounds(tmp_path, tiny_world, [10.0, 40.0, 38.5, 30.0])
    res = runner.invoke(app, ["status", "a", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    (run,) = json.loads(res.stdout)
    assert run["best_round"] == 1 and run["regressed_rounds"] == [3]
    assert [x["round"] for x in run["rounds"]] == [0, 1, 2, 3]
    table = runner.invoke(app, ["status", "a", "--out", str(tmp_path)])
    assert table.exit_code == 0 and "regressed -10.0" in table.stdout and "best" in table.stdout


def test_export_best_and_round_as_plain_hf_dirs(tmp_path, tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _store_with_rounds(tmp_path / "out", tiny_world, [10.0, 40.0, 20.0])
    best, r2 = tmp_path / "best", tmp_path / "r2"
    res = runner.invoke(app, ["export", "a", str(best), "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["round"], info["score"], info["best"]) == (1, 40.0, True)
    r2_args = ["export", "a", str(r2), "--round", "2", "--out", str(tmp_path / "out")]
    assert runner.invoke(app, r2_args).exit_code == 0
    # same weights as the source checkpoints (round 1 = teacher copy, round 2 = student copy)
    for exported, source in ((best, tiny_world.teacher), (r2, tiny_world.student)):
        a, b = load_file(exported / "model.safetensors"), load_file(source / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not (exported / "trainer_state.pt").exists()
        model = AutoModelForCausalLM.from_pretrained(exported)
        tok = AutoTokenizer.from_pretrained(exported)
        assert model.config.model_type == "qwen2" and len(tok) == model.config.vocab_size
    assert not list(tmp_path.glob(".*.tmp-*"))


@pytest.mark.slow
def test_export_loads_in_an_interpreter_without_npd(tmp_path, tiny_world):
    _store_with_rounds(tmp_path / "out", tiny_world, [10.0, 40.0])
    res = runner.invoke(app, ["export", "a", str(tmp_path / "m"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "m = AutoModelForCausalLM.from_pretrained('m'); t = AutoTokenizer.from_pretrained('m');"
        "assert not {'npd_core', 'flows', 'tasks'} & {n.split('.')[0] for n in sys.modules};"
        "ids = t('12,34=', return_tensors='pt').input_ids;"
        "print(m.config.model_type, m(ids).logits.shape[-1] == len(t))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["qwen2", "True"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nope", "DEST"], "no run 'nope'"),
        (
            ["a", "DEST", "--round", "7"],
            "no checkpoint of round 7; its checkpoints are rounds [0, 1]",
        ),
        (["a", "DEST", "--round", "last"], "give 'best' or a round number"),
        (["a", "FULL"], "exists and is not empty"),
    ],
)
def test_export_refusals_are_usage_errors(tmp_path, tiny_world, args, needle):
    _store_with_rounds(tmp_path / "out", tiny_world, [10.0, 40.0])
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep.txt").write_text("mine")
    args = [str(tmp_path / a) if a in ("DEST", "FULL") else a for a in args]
    res = runner.invoke(app, ["export", *args, "--out", str(tmp_path / "out")])
    assert isinstance(res.exception, StoreUsageError) and res.exception.exit_code == 2
    assert needle in str(res.exception)
    assert not (tmp_path / "DEST").exists() and (tmp_path / "FULL" / "keep.txt").read_text()


def _nightly_config(path: Path, world, **extra) -> Path:
    prompts = path.parent / "prompts"
    prompts.mkdir(exist_ok=True)
    lines = world.train_prompts.read_text().splitlines()
    (prompts / "day1.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (prompts / "day2.jsonl").write_text("\n".join(lines[48:96]) + "\n")
    cfg = {
        "rounds": 1,
        "models": {"teacher": str(world.teacher), "student": str(world.student)},
        "data": {
            "prompts": "prompts/*.jsonl",
            "eval_prompts": str(world.eval_prompts),
            "prompts_per_round": 48,
            "eval_size": 32,
        },
        "generate": {"max_new_tokens": 32},
        "train": {"steps_per_round": 3, "rows_per_step": 4, "epochs_per_round": 10},
        "pack": {"max_seq_len": 128},
        "eval": {"batch_size": 64},
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_nightly_runs_continue_from_the_best_and_skip_used_prompts(
    tmp_path, tiny_world, prefect_server, monkeypatch
):
    """Two scheduled runs in a row: the second starts from the first's best checkpoint (recorded
    in runs and in its samples' provenance) on the prompts the first did not use; a pinned
    third run starts from models.student again."""
    from flows.distill import scheduled_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    config = _nightly_config(
        tmp_path / "nightly.yaml", tiny_world, schedule={"skip_used_prompts": True}
    )
    first = scheduled_flow(str(config), str(out))
    second = scheduled_flow(str(config), str(out))
    db = out / "npd.duckdb"
    best = query(
        db,
        "select run_id, round, path, score from checkpoints where is_best and run_id = ?",
        [first["run_id"]],
    ).to_pylist()[0]
    run2 = query(db, "select * from runs where run_id = ?", [second["run_id"]]).to_pylist()[0]
    assert (run2["parent_run_id"], run2["parent_round"]) == (first["run_id"], best["round"])
    assert run2["deployment"] == "npd-scheduled" and Path(run2["student"]) == out / best["path"]
    assert second["start_score"] == best["score"]  # θ_0 of run 2 is run 1's best, re-evaluated
    gen = (
        query(
            db,
            "select distinct generator_checkpoint g from samples where run_id = ?",
            [second["run_id"]],
        )
        .column("g")
        .to_pylist()
    )
    assert gen == [best["path"]]
    # 96 prompts in two files; the first night sampled 48 of them, the second the other 48
    used = [
        set(
            query(db, "select distinct prompt_id from samples where run_id = ?", [r])
            .column(0)
            .to_pylist()
        )
        for r in (first["run_id"], second["run_id"])
    ]
    assert used[0] and used[1] and not used[0] & used[1]
    pinned = _nightly_config(tmp_path / "pinned.yaml", tiny_world, schedule={"pin_student": True})
    third = scheduled_flow(str(pinned), str(out))
    run3 = query(
        db, "select parent_run_id, student from runs where run_id = ?", [third["run_id"]]
    ).to_pylist()[0]
    assert run3 == {"parent_run_id": None, "student": str(tiny_world.student)}
