"""kill -9 of an `npd run` whose learner runs as torchrun ranks (``train.nproc: 2``): no rank
is left behind, and `npd retry` starts new ones (test_crash.py's method, in a file of its own so
the suite's workers share the slow kill tests)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from resume_checks import (
    NPD,
    REPO,
    assert_nothing_duplicated_or_orphaned,
    kill_9,
    npd_env,
    only_run_id,
    run_status,
    stopped_at,
    write_config,
)

from npd_core.pipeline import workers


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
    assert run_status(out, run_id, env)["status"] == "completed"
    assert_nothing_duplicated_or_orphaned(out, run_id)
