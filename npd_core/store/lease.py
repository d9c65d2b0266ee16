"""Which process runs a run. ``runs/<run_id>/run/.lease.json`` names the holder (host, pid and
the pid's start time) and carries a heartbeat. A process killed with ``kill -9`` cannot release
it, so ``npd status`` shows its run as crashed instead of running forever, and a retry refuses
to start a second process on a run whose holder is still alive."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from npd_core.atomic import atomic_file
from npd_core.errors import StoreUsageError

NAME = ".lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0  # a holder on another host counts as gone after this long without a heartbeat


@dataclass
class Holder:
    host: str
    pid: int
    started: int | None  # the pid's start time (Linux), so a reused pid is not taken for it
    beat: float  # time.time() of the last heartbeat
    released: bool = False


def path(root: str | Path, run_id: str) -> Path:
    return Path(root) / "runs" / run_id / "run" / NAME


def read(root: str | Path, run_id: str) -> Holder | None:
    try:
        return Holder(**json.loads(path(root, run_id).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def state(root: str | Path, run_id: str) -> str | None:
    """'running' (holder alive), 'crashed' (holder gone without releasing), 'released', or
    None when the run never had a holder (a run from before leases, or never started)."""
    h = read(root, run_id)
    if h is None:
        return None
    if h.released:
        return "released"
    if h.host == socket.gethostname():
        return "running" if _alive(h.pid, h.started) else "crashed"
    return "running" if time.time() - h.beat < STALE_S else "crashed"


def run_status(root: str | Path, run_id: str, stored: str) -> str:
    """The status to show: a stored 'running' whose holder is gone is 'crashed' (killed) or
    'failed' (it released the lease without completing the run)."""
    if stored != "running":
        return stored
    return {"crashed": "crashed", "released": "failed"}.get(state(root, run_id) or "", stored)


def ensure_free(root: str | Path, run_id: str) -> None:
    """Raise a one-line error when another live process holds the run."""
    other = read(root, run_id)
    if state(root, run_id) == "running" and other is not None and other.pid != os.getpid():
        raise StoreUsageError(
            f"{path(root, run_id)}: run {run_id!r} is still running (pid {other.pid} on "
            f"{other.host}); wait for it to end or stop that process, then retry"
        )


@contextmanager
def hold(
    root: str | Path,
    run_id: str,
    heartbeat_s: float = HEARTBEAT_S,
    clock: Callable[[], float] = time.time,
) -> Iterator[Holder]:
    """Hold the run's lease for the duration of the block (heartbeat in a daemon thread, every
    ``heartbeat_s`` seconds; ``clock`` gives each beat's time)."""
    ensure_free(root, run_id)
    me = Holder(socket.gethostname(), os.getpid(), _start_time(os.getpid()), clock())
    _write(root, run_id, me)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            me.beat = clock()
            _write(root, run_id, me)

    thread = threading.Thread(target=beat, name=f"npd-lease-{run_id}", daemon=True)
    thread.start()
    try:
        yield me
    finally:
        stop.set()
        thread.join()
        me.released, me.beat = True, clock()
        _write(root, run_id, me)


def _write(root: str | Path, run_id: str, h: Holder) -> None:
    with atomic_file(path(root, run_id)) as tmp:
        tmp.write_text(json.dumps(asdict(h)))


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (Linux), None elsewhere or if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _stat(pid)
    if fields is None:
        return started is None  # no /proc: trust the signal probe
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)
