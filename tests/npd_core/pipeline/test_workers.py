"""The persistent torchrun ranks (npd_core/pipeline/workers.py) with a light rank module
(echo_ranks.py): one job after another on the same ranks, rank 0's answer and progress; a rank
that raises fails the job in one line naming it and leaves no process (one killed mid-round:
test_learner_ranks.py); the ranks stop with the scope, and exit by themselves when their owner
is killed with SIGKILL; the next start removes the torchrun log folder a killed owner left."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from npd_core.errors import WorkerError
from npd_core.pipeline import workers

HERE = Path(__file__).parent
MODULE = "echo_ranks"


@pytest.fixture
def echo_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(HERE))  # the ranks import echo_ranks from here
    # a temp dir of the test's own, here and in the processes it starts: a group start in
    # another test's process sweeps the log folders of gone owners from the shared one
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_jobs_failures_and_the_scope(echo_env):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = Path(tempfile.mkdtemp(prefix=f"{workers.LOG_PREFIX}{dead}-"))  # a killed owner's
    with workers.scope():
        group = workers.group(2, MODULE, 1)
        assert group.start_s > 0 and len(set(group.pids)) == 2
        seen = []
        assert group.run(("echo", 1), seen.append) == 0 and seen == [("echo", 1)]
        assert workers.group(2, MODULE, 1) is group and group.run(("echo", 2)) == 0  # kept

        with pytest.raises(WorkerError) as e:
            group.run(("raise", 1))
        msg = str(e.value)
        assert msg.startswith("learner rank 1 of 2 failed: ValueError: rank 1 was asked to raise")
        assert "\n" not in msg and _gone([group.proc.pid, *group.pids])
        assert not stale.exists()  # the group's start swept it

        assert group.log.is_file()  # a failure keeps the log its line names
        assert (group.log.parent / workers.FAILED).is_file()  # no sweep removes it
        shutil.rmtree(group.log.parent)

        last = workers.group(2, MODULE, 1)  # a failed group is replaced
        assert last is not group and last.run(("echo", 3)) == 0
    assert last.proc.returncode == 0 and _gone(last.pids)  # stopped with the scope
    assert not last.log.parent.exists() and workers.live_groups() == []


OWNER = """
import os, signal, sys
from npd_core.pipeline import workers
g = workers.group(2, "echo_ranks", 1)
assert g.run(("echo", 0)) == 0
print(g.log.parent, g.proc.pid, *g.pids, flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_ranks_exit_when_their_owner_is_killed(echo_env):
    """An owner stopped with its ranks idle, then killed with SIGKILL (no atexit, no scope):
    the ranks see it gone and exit, and torchrun's agent with them."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    logs, *found = owner.stdout.readline().split()
    pids = [int(x) for x in found]  # torchrun's agent, the 2 ranks
    try:
        _, how = os.waitpid(owner.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(how) and len(pids) == 3 and not _gone(pids, within_s=0)
        os.kill(owner.pid, signal.SIGKILL)
        os.waitpid(owner.pid, 0)
        assert _gone(pids)
        assert Path(logs).is_dir()  # the killed owner could not remove its torchrun log
        assert Path(logs) in workers.sweep() and not Path(logs).exists()  # the next start does
    finally:
        for pid in [owner.pid, *pids]:  # whatever a failed assertion left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(logs, ignore_errors=True)  # whatever a failed assertion left


def _gone(pids: list[int], within_s: float = 60.0) -> bool:
    """Every process of ``pids`` is gone (or a zombie) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while any(_running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("failed", "named"),
    [
        # rank 1 raised; torchrun then stopped rank 0 (SIGTERM): the error is the cause
        ({0: ("stopped", 5.0), 1: ("error", "ValueError: boom", 4.0)}, "rank 1 of 2 failed: Value"),
        # rank 1 was killed (no report); rank 0's collective failed after it
        ({0: ("error", "RuntimeError: gloo", 4.0), 1: None}, "rank 1 of 2 died (killed"),
        # both raised: the earlier one
        ({0: ("error", "B: b", 6.0), 1: ("error", "A: a", 5.0)}, "rank 1 of 2 failed: A: a"),
        # only stops: the cause is unknown, named as a death
        ({0: ("stopped", 5.0), 1: ("stopped", 5.1)}, "rank 0 of 2 died (killed"),
    ],
)
def test_the_failure_named_is_the_cause(failed, named):
    group = object.__new__(workers.WorkerGroup)
    group.nproc, group.log, group.conns = 2, Path("torchrun.log"), []
    msg = str(group._first_failure(dict(failed), pending={0, 1}))
    assert msg.startswith(f"learner {named}") and msg.endswith("torchrun log: torchrun.log")
