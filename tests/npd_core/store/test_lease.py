"""The run lease: a live holder is 'running', a killed one 'crashed', a released one ends it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from npd_core.errors import StoreUsageError
from npd_core.store import lease

HOLD_AND_WAIT = """
import sys, time
from npd_core.store import lease
with lease.hold(sys.argv[1], "r1"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_holder_states_and_status(tmp_path):
    """The holder's first beat is written before the block starts; the heartbeat thread writes
    the clock's next times (its third reading comes after the second one was written); the
    release writes the last."""
    assert lease.state(tmp_path, "r1") is None
    assert lease.run_status(tmp_path, "r1", "running") == "running"  # no lease: as stored
    readings = itertools.count(100.0, 100.0)
    third = threading.Event()

    def clock() -> float:
        t = next(readings)
        if t == 300.0:
            third.set()
        return t

    with lease.hold(tmp_path, "r1", heartbeat_s=0.0, clock=clock) as me:
        first = lease.read(tmp_path, "r1")
        assert first.pid == os.getpid() and first.beat == 100.0
        assert lease.state(tmp_path, "r1") == "running"
        assert third.wait(timeout=60)
        assert lease.read(tmp_path, "r1").beat >= 200.0  # the heartbeat thread beats
        lease.ensure_free(tmp_path, "r1")  # this process may go on holding it
    assert me.released and lease.read(tmp_path, "r1").beat == me.beat > 200.0
    assert lease.state(tmp_path, "r1") == "released"
    assert lease.run_status(tmp_path, "r1", "running") == "failed"
    assert lease.run_status(tmp_path, "r1", "completed") == "completed"


def test_killed_holder_is_crashed_and_frees_the_run(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        assert lease.state(tmp_path, "r1") == "running"
        with pytest.raises(StoreUsageError, match=f"still running \\(pid {proc.pid}"):
            lease.ensure_free(tmp_path, "r1")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lease.state(tmp_path, "r1") == "crashed"
    assert lease.run_status(tmp_path, "r1", "running") == "crashed"
    lease.ensure_free(tmp_path, "r1")


def test_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    with lease.hold(tmp_path, "r1"):
        pass
    h = replace(lease.read(tmp_path, "r1"), host="elsewhere", released=False, pid=1)
    lease._write(tmp_path, "r1", replace(h, beat=time.time()))
    assert lease.state(tmp_path, "r1") == "running"
    lease._write(tmp_path, "r1", replace(h, beat=time.time() - lease.STALE_S - 1))
    assert lease.state(tmp_path, "r1") == "crashed"
