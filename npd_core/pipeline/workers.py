"""Persistent torchrun ranks, fed one job at a time by the process that started them.

Why persistent: a 2-rank torchrun whose ranks import torch and transformers takes 10–13 s to
start on the 2-core test machine, longer than a toy round. So a flow run starts its ranks on
its first job and keeps them until it ends (``scope``), fails or is killed; the next flow run
(a retry) starts them again.

How: ``torchrun --standalone`` runs N ranks of a module whose main calls :func:`serve`. Each
rank joins the default process group (gloo on CPU, NCCL on GPUs), connects back to its owner
over an authenticated loopback socket (``multiprocessing.connection``) and answers jobs: every
rank gets each job, rank 0's answer is the result, and rank 0 may send progress meanwhile.

Failure: a rank that raises sends its error as one line and exits; a rank that dies (kill -9,
out of memory) closes its socket. Either fails the job with one line naming that rank, and the
group is torn down (torchrun stops the other ranks). No orphans: every rank watches its owner
and its torchrun agent and exits when either is gone, and torchrun exits with its ranks. A
killed owner cannot remove its torchrun log folder (``npd-workers-<pid>-…`` in the temp dir):
the next group start, in any process (``npd retry``), removes those of owners that are gone.
"""

from __future__ import annotations

import atexit
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path
from typing import Any

from npd_core.errors import NPDError, WorkerError, first_line

OWNER_ENV = "NPD_WORKERS_OWNER"  # pid of the process that started the group
ADDRESS_ENV = "NPD_WORKERS_ADDRESS"  # host:port of its listener
KEY_ENV = "NPD_WORKERS_KEY"  # the listener's authentication key, hex
START_TIMEOUT_S = 900.0  # a busy 2-core machine imports slowly
STOP_TIMEOUT_S = 30.0
POLL_S = 0.5
ERROR_GRACE_S = 2.0  # after a rank's failure, how long the others' reports are awaited
LOG_PREFIX = "npd-workers-"  # + the owner's pid: a group's torchrun log folder in the temp dir
FAILED = "failed"  # marks a folder whose log a WorkerError line names

Progress = Callable[[Any], None]


class WorkerGroup:
    """N torchrun ranks of ``module`` (whose main calls :func:`serve`) and their sockets."""

    def __init__(self, nproc: int, module: str, threads: int) -> None:
        t0 = time.perf_counter()
        self.nproc, self.module, self.jobs = nproc, module, 0
        self.closed, self._lock = False, threading.Lock()
        self.conns: list[Connection] = []
        self.pids: list[int] = []  # of each rank, by rank
        sweep()
        self.log = Path(tempfile.mkdtemp(prefix=f"{LOG_PREFIX}{os.getpid()}-")) / "torchrun.log"
        key = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), backlog=nproc, authkey=key)
        host, port = self._listener.address
        env = {
            **os.environ,
            OWNER_ENV: str(os.getpid()),
            ADDRESS_ENV: f"{host}:{port}",
            KEY_ENV: key.hex(),
            "OMP_NUM_THREADS": str(threads),
        }
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", module]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._accept()
        except BaseException:
            self.close(keep_log=True)
            raise
        self.start_s = time.perf_counter() - t0  # torchrun, imports, process group, sockets

    @property
    def alive(self) -> bool:
        return not self.closed and self.proc.poll() is None

    def _accept(self) -> None:
        """Wait for every rank's ``ready`` (a thread accepts; this one watches torchrun)."""
        got: queue.Queue = queue.Queue()

        def accept() -> None:
            try:
                for _ in range(self.nproc):
                    conn = self._listener.accept()
                    got.put((conn, conn.recv()))
            except (OSError, EOFError):
                pass  # the listener was closed: the start failed

        threading.Thread(target=accept, daemon=True, name="npd-workers-accept").start()
        ready: dict[int, tuple[Connection, int]] = {}
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(ready) < self.nproc:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = self.proc.returncode
                how = "timed out" if said is None else f"torchrun exited with {said}"
                raise WorkerError(
                    f"the {self.nproc} learner ranks did not start ({how}: {self._last_line()}); "
                    f"torchrun log: {self.log}"
                )
            try:
                conn, (_, rank, pid) = got.get(timeout=POLL_S)
            except queue.Empty:
                continue
            ready[rank] = (conn, pid)
        self.conns = [ready[k][0] for k in range(self.nproc)]
        self.pids = [ready[k][1] for k in range(self.nproc)]

    def run(self, job: Any, progress: Progress | None = None) -> Any:
        """Give ``job`` to every rank and return rank 0's answer; ``progress`` gets what rank 0
        reports meanwhile. A rank that fails or dies tears the group down and raises one
        ``WorkerError`` line naming it."""
        with self._lock:
            if not self.alive:
                raise WorkerError(f"the learner ranks are gone; torchrun log: {self.log}")
            self.jobs += 1
            try:
                return self._run(job, progress)
            except BaseException:
                self.close(keep_log=True)
                raise

    def _run(self, job: Any, progress: Progress | None) -> Any:
        for conn in self.conns:
            conn.send(job)
        pending, result = set(range(self.nproc)), None
        while pending:
            ready = wait([self.conns[k] for k in sorted(pending)], timeout=POLL_S)
            if not ready and self.proc.poll() is not None:
                raise self._failure(min(pending), None)
            events = [(self.conns.index(c), _received(c)) for c in ready]
            failed = {rank: msg for rank, msg in events if _is_failure(msg)}
            if failed:
                raise self._first_failure(failed, pending)
            for rank, msg in events:
                kind, payload = msg
                if kind == "progress" and progress is not None:
                    progress(payload)
                elif kind == "done":
                    pending.discard(rank)
                    result = payload if rank == 0 else result
        return result

    def _first_failure(self, failed: dict[int, Any], pending: set[int]) -> WorkerError:
        """The failure to name: a rank that fails makes its peers fail too (their collectives
        lose it), sometimes before its own report arrives, so the owner waits up to
        ``ERROR_GRACE_S`` for the other ranks' reports and names a rank that died without a
        report (killed: its peers' errors follow from it), else the error raised first; a rank
        that torchrun stopped after a peer's failure (``stopped``) is never the cause."""
        deadline = time.monotonic() + ERROR_GRACE_S
        while (rest := [k for k in sorted(pending) if k not in failed]) and (
            left := deadline - time.monotonic()
        ) > 0:
            for c in wait([self.conns[k] for k in rest], timeout=left):
                msg = _received(c)
                if _is_failure(msg):
                    failed[self.conns.index(c)] = msg
        died = [k for k, msg in failed.items() if msg is None]
        errors = {k: msg for k, msg in failed.items() if msg is not None and msg[0] == "error"}
        if died or not errors:
            return self._failure(min(died or failed), None)
        rank = min(errors, key=lambda k: (errors[k][2], k))
        return self._failure(rank, errors[rank][1])

    def _failure(self, rank: int, error: str | None) -> WorkerError:
        what = f"failed: {error}" if error else "died (killed, or out of memory)"
        return WorkerError(f"learner rank {rank} of {self.nproc} {what}; torchrun log: {self.log}")

    def _last_line(self) -> str:
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1].strip() if lines else "no output"

    def close(self, keep_log: bool = False) -> None:
        """Stop the ranks: ask them to leave (or, after a failure, have torchrun stop them)
        and wait for torchrun; its log is kept when asked (a failure names it)."""
        if self.closed:
            return
        self.closed = True
        clean = not keep_log
        for conn in self.conns:
            try:
                if clean:
                    conn.send(None)
                conn.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S if clean else 0.1)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # torchrun stops its ranks
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the ranks see their agent gone and exit
                self.proc.wait()
        self._listener.close()
        if clean:
            shutil.rmtree(self.log.parent, ignore_errors=True)
        else:
            (self.log.parent / FAILED).touch()  # the log a failure named: no sweep removes it


def _is_failure(msg: tuple | None) -> bool:
    """A rank's message that ends the job: its death (None), its error, or its stop."""
    return msg is None or msg[0] in ("error", "stopped")


def _received(conn: Connection) -> tuple[str, Any] | None:
    """The next message of a rank, or None when its socket closed (it died)."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def sweep() -> list[Path]:
    """Remove the torchrun log folders of owners that are gone without closing their group
    (killed with SIGKILL: no ``close`` ran), but not a failure's, whose log an error line
    names; every group start calls it. Returns what it removed."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{LOG_PREFIX}*-*"):
        owner = d.name.removeprefix(LOG_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)) and not (d / FAILED).exists():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# ------------------------------------------------------------------ this process's groups
_groups: dict[tuple[int, str, int], WorkerGroup] = {}
_groups_lock = threading.Lock()


def group(nproc: int, module: str, threads: int) -> WorkerGroup:
    """The live group of ``nproc`` ranks of ``module`` at ``threads`` threads each, started on
    first use (a group that failed is replaced)."""
    key = (nproc, module, threads)
    with _groups_lock:
        g = _groups.get(key)
        if g is None or not g.alive:
            g = _groups[key] = WorkerGroup(nproc, module, threads)
        return g


def live_groups() -> list[WorkerGroup]:
    with _groups_lock:
        return [g for g in _groups.values() if g.alive]


def close_all() -> None:
    """Stop every group this process started."""
    with _groups_lock:
        groups = list(_groups.values())
        _groups.clear()
    for g in groups:
        g.close()


@contextmanager
def scope() -> Iterator[None]:
    """Groups started inside live until the block ends (a flow run), however it ends."""
    try:
        yield
    finally:
        close_all()


atexit.register(close_all)


# ------------------------------------------------------------------ the rank's side
def serve(handle: Callable[[Any, Progress], Any]) -> None:
    """A rank's life (its module's main): join the process group, connect to the owner and
    answer its jobs with ``handle(job, progress)`` until it says stop; ``progress`` reaches the
    owner from rank 0 only. Exits when the owner or the torchrun agent is gone."""
    import torch
    import torch.distributed as dist

    _watch(int(os.environ[OWNER_ENV]), os.getppid())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    host, port = os.environ[ADDRESS_ENV].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[KEY_ENV]))
    rank = dist.get_rank()
    conn.send(("ready", rank, os.getpid()))

    def stopped(signum: int, _frame: Any) -> None:
        """torchrun stops the other ranks with SIGTERM once one has failed: say so, so the
        owner does not take this death for the cause (a killed rank sends nothing)."""
        with suppress(OSError):  # the owner has closed its end (a failure it already named)
            conn.send(("stopped", time.time()))
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)

    def progress(msg: Any) -> None:
        if rank == 0:
            conn.send(("progress", msg))

    while (job := _received(conn)) is not None:
        try:
            result = handle(job, progress)
        except Exception as exc:  # the owner gets one line; the log the traceback
            traceback.print_exc()
            line = f"{type(exc).__name__}: {first_line(exc)}"
            conn.send(("error", str(exc) if isinstance(exc, NPDError) else line, time.time()))
            sys.stderr.flush()
            os._exit(1)  # torchrun sees a failed rank and stops the others
        conn.send(("done", result if rank == 0 else None))
    dist.destroy_process_group()


def _watch(owner: int, agent: int) -> None:
    """Exit this rank when ``owner`` is gone (or a zombie) or the torchrun agent is."""

    def run() -> None:
        while _alive(owner) and os.getppid() == agent:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=run, daemon=True, name="npd-workers-watch").start()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a killed process not yet reaped by its parent does not)."""
    stat = Path(f"/proc/{pid}/stat")
    if not Path("/proc/self/stat").exists():  # no procfs: a zombie counts as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
