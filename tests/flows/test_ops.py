"""Operating npd: best checkpoint and regressions, export, nightly continuation, `npd ui`,
served deployments, and the scale-out switch (producer/consumer chains on two work pools)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from resume_checks import (
    NPD,
    REPO,
    assert_nothing_duplicated_or_orphaned,
    assert_same_as_reference,
    free_port,
    npd_env,
    only_run_id,
    stop_group,
    write_config,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from npd_core.config import NPDConfig
from npd_core.errors import StoreUsageError
from npd_core.servers import healthy
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
        "threads": 1,
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
        [first.run_id],
    ).to_pylist()[0]
    run2 = query(db, "select * from runs where run_id = ?", [second.run_id]).to_pylist()[0]
    assert (run2["parent_run_id"], run2["parent_round"]) == (first.run_id, best["round"])
    assert run2["deployment"] == "npd-scheduled" and Path(run2["student"]) == out / best["path"]
    assert second.start_score == best["score"]  # θ_0 of run 2 is run 1's best, re-evaluated
    gen = (
        query(
            db,
            "select distinct generator_checkpoint g from samples where run_id = ?",
            [second.run_id],
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
        for r in (first.run_id, second.run_id)
    ]
    assert used[0] and used[1] and not used[0] & used[1]
    pinned = _nightly_config(tmp_path / "pinned.yaml", tiny_world, schedule={"pin_student": True})
    third = scheduled_flow(str(pinned), str(out))
    run3 = query(
        db, "select parent_run_id, student from runs where run_id = ?", [third.run_id]
    ).to_pylist()[0]
    assert run3 == {"parent_run_id": None, "student": str(tiny_world.student)}


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid → (parent pid, state, start time) of every process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(d.name)] = (int(fields[1]), fields[0], fields[19])
    return out


def _descendants(pid: int) -> dict[int, str]:
    """pid → start time of every live descendant of ``pid``."""
    procs, found, todo = _procs(), {}, [pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, state, started) in procs.items():
            if ppid == parent and state != "Z":
                found[p] = started
                todo.append(p)
    return found


@pytest.mark.slow
def test_npd_ui_serves_both_and_ctrl_c_stops_every_process(tmp_path, prefect_api):
    port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(prefect_api.fresh_home(tmp_path / "prefect-home"))}
    ui = subprocess.Popen(
        [
            *NPD,
            "ui",
            "--out",
            str(tmp_path / "out"),
            "--port",
            str(port),
            "--mlflow-port",
            str(mlflow_port),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    rest = ""  # raw reads: a buffered readline would hide lines that arrived in one write
    try:
        deadline = time.monotonic() + 400
        while "Ctrl-C stops both" not in lines:  # printed once both answer
            assert time.monotonic() < deadline, f"npd ui not ready: {lines}"
            if select.select([ui.stderr], [], [], 1.0)[0]:
                chunk = os.read(ui.stderr.fileno(), 65536).decode()
                assert chunk, f"npd ui exited: {lines}"
                *done, rest = (rest + chunk).split("\n")
                lines += [x.strip() for x in done]
        assert healthy(f"http://127.0.0.1:{port}/api/health")
        assert healthy(f"http://127.0.0.1:{mlflow_port}/health")
        family = _descendants(ui.pid)
        # prefect server (one process in Prefect 3.9), mlflow ui + its uvicorn worker, at least
        assert len(family) >= 3, family
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=120) == 0
    finally:
        if ui.poll() is None:  # a failed assertion: still let npd ui stop its groups
            ui.send_signal(signal.SIGINT)
            try:
                ui.wait(timeout=120)
            except subprocess.TimeoutExpired:
                ui.kill()
    stderr = "\n".join(lines) + "\n" + rest + ui.stderr.read()
    assert f"prefect: http://127.0.0.1:{port}" in stderr
    assert f"mlflow: http://127.0.0.1:{mlflow_port}" in stderr
    assert "stopped prefect and mlflow" in stderr
    procs = _procs()
    survivors = {
        p
        for p, started in family.items()
        if p in procs and procs[p][2] == started and procs[p][1] != "Z"
    }
    assert not survivors
    assert (tmp_path / "out" / "mlflow.db").is_file()  # the MLflow store is the output dir's


ROOT = REPO


def test_serve_deploys_the_nightly_flow_with_its_cron_and_config(tmp_path):
    from flows.serve import deployments

    (tmp_path / "c.yaml").write_text("rounds: 2\n")
    (d,) = deployments(tmp_path / "c.yaml", tmp_path / "out", "30 1 * * *")
    assert (d.flow_name, d.name) == ("npd-scheduled", "nightly")
    assert d.parameters == {"config": str(tmp_path / "c.yaml"), "out": str(tmp_path / "out")}
    assert [s.schedule.cron for s in d.schedules] == ["30 1 * * *"]


def test_prefect_yaml_validates_and_its_entrypoints_load():
    """What `prefect deploy` checks first: the file's schema, then each entrypoint's flow and
    the parameters it is given (the slow scale-out test deploys two entries for real)."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in model.deployments] == ["nightly", "npd-generate", "npd-train"]
    flows = {}
    for d in raw["deployments"]:
        fl = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        flows[d["name"]] = fl.name
        assert set(d.get("parameters", {})) <= set(fl.parameters.properties)
        assert d["work_pool"]["name"]
    assert flows == {
        "nightly": "npd-scheduled",
        "npd-generate": "npd-produce",
        "npd-train": "npd-consume",
    }
    (cron,) = raw["deployments"][0]["schedules"]
    assert CronSchedule(cron=cron["cron"], timezone=cron["timezone"]).cron == "0 2 * * *"
    # run_deployment("<flow>/<pool>") finds each remote chain on the pool it is named after
    for d in raw["deployments"][1:]:
        assert d["name"] == d["work_pool"]["name"]


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )


POOLS = ("npd-generate", "npd-train")


@pytest.fixture
def pool_workers(tmp_path, prefect_api) -> Iterator[dict[str, str]]:
    """A process worker on each scale-out pool of the session's Prefect server and the two
    deployments of deployments/prefect.yaml on them; yields the environment in which an
    `npd run` reports to that server. The workers are stopped at the end."""
    env = npd_env(
        prefect_api,
        tmp_path / "prefect-home",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp_path / "prefect-results"),
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    py = [sys.executable, "-m", "prefect"]
    workers = []
    try:
        for pool in POOLS:
            subprocess.run(
                [*py, "work-pool", "create", pool, "--type", "process", "--overwrite"],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
                timeout=300,
            )
            workers.append(
                _start([*py, "worker", "start", "--pool", pool], env, tmp_path / f"{pool}.log")
            )
        deploy = [*py, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml"]
        deploy += [arg for pool in POOLS for arg in ("--name", pool)]
        done = subprocess.run(
            deploy, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        yield env
    finally:
        for w in workers:
            stop_group(w)


@pytest.mark.slow
def test_generation_and_training_on_two_work_pools(
    tmp_path, tiny_world, prefect_api, pool_workers, reference
):
    """orchestration.generate_pool/train_pool: a real Prefect server, a process worker on each
    pool, the two deployments from deployments/prefect.yaml, and `npd run`: the producer chains
    run on one pool, the consumer chains on the other, and the tables and weights equal those of
    the same config run in-process (the session's reference run)."""
    cfg = yaml.safe_load(write_config(tmp_path, tiny_world).read_text())
    cfg["orchestration"] = {"generate_pool": "npd-generate", "train_pool": "npd-train"}
    (tmp_path / "pools.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    res = subprocess.run(
        [*NPD, "run", str(tmp_path / "pools.yaml"), "--out", str(out), "--json"],
        env=pool_workers,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr
    body = {"flows": {"name": {"any_": ["npd-produce", "npd-consume"]}}}
    chains = prefect_api.post("/flow_runs/filter", body).json()
    flow_names = {f["id"]: f["name"] for f in prefect_api.post("/flows/filter", {}).json()}
    ran_on = sorted(
        (flow_names[f["flow_id"]], f["work_pool_name"], f["state_type"]) for f in chains
    )
    assert (
        ran_on
        == [("npd-consume", "npd-train", "COMPLETED")] * 3
        + [("npd-produce", "npd-generate", "COMPLETED")] * 2
    )  # θ_0..θ_2 evaluated, D_1 and D_2 produced
    run_id = only_run_id(out)
    rows = assert_same_as_reference(out, run_id, reference)
    assert rows["samples"] == 2 * 32 and rows["evals"] == 3
    assert_nothing_duplicated_or_orphaned(out, run_id)
    # the producer chains wrote from their own flow runs (not the parent's)
    parent = query(out / "npd.duckdb", "select flow_run_id from runs").column(0)
    writers = (
        query(out / "npd.duckdb", "select distinct flow_run_id from samples").column(0).to_pylist()
    )
    assert len(writers) == 2 and parent[0].as_py() not in writers
