"""kill -9 survived: a real `npd run` subprocess stops itself at a chosen point (NPD_PAUSE_AT,
so the kill lands there every time), is killed with SIGKILL, shows as crashed in `npd status`,
and `npd retry` resumes it from the last complete checkpoint to the tables and weights of a
clean run. Nothing half-written is ever visible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from resume_checks import (
    NPD,
    REPO,
    all_stages,
    assert_nothing_duplicated_or_orphaned,
    assert_same_as_reference,
    npd,
    npd_env,
    only_run_id,
    stage_counts,
    stage_states,
    stop_group,
    write_config,
)

from npd_core.pipeline import workers
from npd_core.store import query


def _status(out, run_id, env) -> dict:
    res = npd("status", run_id, "--out", str(out), "--json", env=env)
    assert res.returncode == 0, res.stderr
    (run,) = json.loads(res.stdout)
    return run


@contextmanager
def stopped_at(point: str, cfg: Path, out: Path, env: dict[str, str]) -> Iterator[int]:
    """`npd run CFG` in its own process group, stopped by itself at ``point`` (NPD_PAUSE_AT);
    yields its pid. The caller kills it (``kill_9``); its whole group is stopped at the end."""
    proc = subprocess.Popen(
        [*NPD, "run", str(cfg), "--out", str(out)],
        env={**env, "NPD_PAUSE_AT": point},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, how = os.waitpid(proc.pid, os.WUNTRACED)  # returns when it stops at the point
        assert os.WIFSTOPPED(how), proc.stderr.read()[-3000:]
        yield proc.pid
    finally:
        stop_group(proc)


def kill_9(pid: int) -> None:
    """SIGKILL to the flow's process only (not its group), reaped."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


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
        assert _status(out, run_id, env)["status"] == "running"  # stopped, but alive
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
    assert _status(out, run_id, env)["status"] == "crashed"
    ran_before = stage_counts(out, run_id)
    flow_run_id = query(out / "npd.duckdb", "select flow_run_id from runs").column(0)[0].as_py()
    done = {k for k, v in stage_states(prefect_api, flow_run_id).items() if v == "Completed"}
    assert killed not in done and ("evaluate", 0) in done

    resumed = npd("retry", run_id, "--out", str(out), "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the summary names what came from the cache; the overhead counts the rest only
    summary = json.loads(resumed.stdout)
    assert {tuple(x) for x in summary["reused_stages"]} == done and summary["overhead_s"] >= 0
    assert _status(out, run_id, env)["status"] == "completed"
    # the stages Prefect saw complete before the kill did not run again; the killed one did
    counts = stage_counts(out, run_id)
    assert set(counts) == all_stages() and ran_before[killed] == 1 and counts[killed] == 2
    assert {k: counts[k] for k in done} == {k: 1 for k in done}
    assert all(counts[k] - ran_before[k] <= 1 for k in all_stages() - done)
    assert_same_as_reference(out, run_id, reference)
    assert_nothing_duplicated_or_orphaned(out, run_id)  # the temp folder was swept


def _ranks_of(owner: int) -> set[int]:
    """Processes started for ``owner``'s learner ranks (the torchrun agent and its ranks carry
    its pid in their environment), zombies aside."""
    tag = f"{workers.OWNER_ENV}={owner}".encode()
    found = set()
    for d in Path("/proc").iterdir():
        try:
            running = (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if d.name.isdigit() and running and tag in (d / "environ").read_bytes().split(b"\0"):
                found.add(int(d.name))
        except OSError:
            continue
    return found


def _none_left(owner: int, within_s: float = 60.0) -> bool:
    deadline = time.monotonic() + within_s
    while _ranks_of(owner):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_kill_9_leaves_no_learner_rank_and_retry_starts_them_again(
    tmp_path, tiny_world, prefect_api
):
    """`npd run` with train.nproc 2, killed with SIGKILL in round 2 while its torchrun ranks
    wait for work: they exit by themselves; `npd retry` starts new ranks, completes the run
    and leaves none behind either."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path, tiny_world)
    data = yaml.safe_load(cfg.read_text())
    data["train"]["nproc"] = 2
    cfg.write_text(yaml.safe_dump(data))
    env = npd_env(prefect_api, tmp_path / "prefect")
    with stopped_at("train:2:2", cfg, out, env) as pid:  # after round 2's 2nd step
        assert len(_ranks_of(pid)) == 3  # torchrun's agent and 2 ranks
        kill_9(pid)
        assert _none_left(pid)
    run_id = only_run_id(out)
    retry = subprocess.Popen(
        [*NPD, "retry", run_id, "--out", str(out), "--json"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = retry.communicate(timeout=600)
    assert retry.returncode == 0, stderr[-3000:]
    assert ("train", 2) not in {tuple(x) for x in json.loads(stdout)["reused_stages"]}
    assert _none_left(retry.pid, within_s=0)  # stopped with the flow run, not left behind
    assert _status(out, run_id, env)["status"] == "completed"
    assert_nothing_duplicated_or_orphaned(out, run_id)


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
    run = _status(out, run_id, env)
    assert run["status"] == "completed"
    best = run["best_round"]
    weights = {x["round"] for x in run["rounds"] if x["weights"] and x["round"] > 0}
    assert weights == {3} | ({best} - {0})
    assert {d.name for d in ckpts.iterdir()} == {f"round={r}" for r in weights}
    assert {d.parent.name for d in ckpts.glob("*/trainer_state.pt")} == {"round=3"}
    exported = npd("export", run_id, str(tmp_path / "best"), "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr[-3000:]
