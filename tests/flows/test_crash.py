"""kill -9 survived: a real `npd run` subprocess stops itself at a chosen point (NPD_PAUSE_AT,
so the kill lands there every time), is killed with SIGKILL, shows as crashed in `npd status`,
and `npd retry` resumes it from the last complete checkpoint to the tables and weights of a
clean run. Nothing half-written is ever visible."""

from __future__ import annotations

import json

import pytest
import yaml
from resume_checks import (
    all_stages,
    assert_nothing_duplicated_or_orphaned,
    assert_same_as_reference,
    kill_9,
    npd,
    npd_env,
    only_run_id,
    run_status,
    stage_counts,
    stage_states,
    stopped_at,
    write_config,
)

from npd_core.store import query


@pytest.mark.parametrize(
    ("point", "killed"),
    [
        pytest.param("write:score:2", ("score", 2), id="store-write"),
        pytest.param("train:2:2", ("train", 2), id="training", marks=pytest.mark.slow),
        pytest.param("checkpoint:round=2", ("train", 2), id="checkpoint", marks=pytest.mark.slow),
    ],
)
def test_kill_9_then_retry_resumes(point, killed, tmp_path, tiny_world, prefect_api, reference):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, tiny_world)
    env = npd_env(prefect_api, tmp_path / "prefect")
    with stopped_at(point, cfg, out, env) as pid:
        run_id = only_run_id(out)
        run_dir = out / "runs" / run_id
        assert run_status(out, run_id, env)["status"] == "running"  # stopped, but alive
        refused = npd("retry", run_id, "--out", str(out), env=env)
        assert refused.returncode == 2 and "still running" in refused.stderr

        # stopped mid-write: the half-written stage or checkpoint sits in a hidden temp folder
        # that no reader sees
        stage, r = killed
        if point.startswith("write:"):
            assert list((run_dir / f"round={r}").glob(f".{stage}.tmp-*/*.parquet"))
            assert not (run_dir / f"round={r}" / stage).exists()
            n = query(out / "npd.duckdb", f"select count(*) from scores where round = {r}")
            assert n.column(0).to_pylist() == [0]
        if point.startswith("checkpoint:"):
            assert list((run_dir / "checkpoints").glob(f".round={r}.tmp-*/model.safetensors"))
        assert not (run_dir / "checkpoints" / f"round={r}").exists()
        kill_9(pid)
    assert run_status(out, run_id, env)["status"] == "crashed"
    ran_before = stage_counts(out, run_id)
    flow_run_id = query(out / "npd.duckdb", "select flow_run_id from runs").column(0)[0].as_py()
    done = {k for k, v in stage_states(prefect_api, flow_run_id).items() if v == "Completed"}
    assert killed not in done and ("evaluate", 0) in done

    resumed = npd("retry", run_id, "--out", str(out), "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the summary names what came from the cache; the overhead counts the rest only
    summary = json.loads(resumed.stdout)
    assert {tuple(x) for x in summary["reused_stages"]} == done and summary["overhead_s"] >= 0
    assert run_status(out, run_id, env)["status"] == "completed"
    # the stages Prefect saw complete before the kill did not run again; the killed one did
    counts = stage_counts(out, run_id)
    assert set(counts) == all_stages() and ran_before[killed] == 1 and counts[killed] == 2
    assert {k: counts[k] for k in done} == {k: 1 for k in done}
    assert all(counts[k] - ran_before[k] <= 1 for k in all_stages() - done)
    assert_same_as_reference(out, run_id, reference)
    assert_nothing_duplicated_or_orphaned(out, run_id)  # the temp folder was swept


@pytest.mark.slow
def test_kill_9_while_pruning_then_retry_completes(tmp_path, tiny_world, prefect_api):
    """A 3-round `npd run` with train.keep_checkpoints 1 (staleness 0) stopped at ``prune:2``
    (θ_2's evaluation written, the pruned round renamed to hidden trash, not yet deleted) and
    killed: `npd retry` evaluates θ_2 again, trains round 3 from θ_2's optimizer state and ends
    with the weights of the best round and the last one, the last round's optimizer state
    only, no trash, and the best exportable."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path, tiny_world)
    data = yaml.safe_load(cfg.read_text())
    data.update(rounds=3, staleness=0)
    data["train"]["keep_checkpoints"] = 1
    cfg.write_text(yaml.safe_dump(data))
    env = npd_env(prefect_api, tmp_path / "prefect")
    with stopped_at("prune:2", cfg, out, env) as pid:
        run_id = only_run_id(out)
        ckpts = out / "runs" / run_id / "checkpoints"
        # round 1 is either kept (the best so far) or hidden trash: never half there
        assert (ckpts / "round=1" / "config.json").is_file() != bool(
            list(ckpts.glob(".round=1.trash-*"))
        )
        assert not (ckpts / "round=1" / "trainer_state.pt").exists()
        kill_9(pid)
    resumed = npd("retry", run_id, "--out", str(out), "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reused = {tuple(x) for x in json.loads(resumed.stdout)["reused_stages"]}
    assert ("train", 2) in reused and ("evaluate", 2) not in reused
    run = run_status(out, run_id, env)
    assert run["status"] == "completed"
    best = run["best_round"]
    weights = {x["round"] for x in run["rounds"] if x["weights"] and x["round"] > 0}
    assert weights == {3} | ({best} - {0})
    assert {d.name for d in ckpts.iterdir()} == {f"round={r}" for r in weights}
    assert {d.parent.name for d in ckpts.glob("*/trainer_state.pt")} == {"round=3"}
    exported = npd("export", run_id, str(tmp_path / "best"), "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr[-3000:]
