"""The servers behind ``npd ui``: a local Prefect server and the MLflow UI over one output
directory, stopped together on Ctrl-C or SIGTERM. Plain subprocess and socket code (no Prefect or
MLflow import): the command only wires options and printing to :func:`serve_ui`.

Each service starts in its own session (so its own process group) and is stopped by signalling
the whole group, so that no process it started (the MLflow UI's uvicorn worker, the workers of a
Prefect server) outlives it.

Prefect's UI does not learn its API's address from ``--port``: it asks ``/ui-settings``, which
answers ``PREFECT_UI_API_URL`` (else ``PREFECT_API_URL``, else port 4200). The server is started
with that setting pointing at itself, so the UI works on any port and whatever the caller's
``PREFECT_API_URL`` says.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from npd_core.errors import NPDError

HEALTH_TIMEOUT_S = 180.0  # first start of a Prefect server migrates its database
HOST = "127.0.0.1"  # loopback only: neither server asks who is calling


def prefect_api_url(port: int) -> str:
    """The Prefect server's API on ``port``: what its UI calls and what runs report to."""
    return f"http://{HOST}:{port}/api"


@dataclass(frozen=True)
class Command:
    """How to start one service: its argv, the environment it needs on top of ours, the port it
    binds and the ``npd ui`` option that sets that port (named when the port is taken)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    flag: str
    health_path: str  # answers 200 once the service is up

    @property
    def url(self) -> str:
        """What a person opens."""
        return f"http://{HOST}:{self.port}"

    @property
    def health(self) -> str:
        return self.url + self.health_path


@dataclass
class Service:
    command: Command
    proc: subprocess.Popen
    log: Path

    @property
    def name(self) -> str:
        return self.command.name


def commands(out: Path, port: int, mlflow_port: int) -> list[Command]:
    """The Prefect server (its UI told its own API URL) and the MLflow UI over the output
    directory's store and artifacts, without MLflow's job runner."""
    out = out.resolve()
    py = sys.executable
    return [
        Command(
            "prefect",
            [py, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
            {"PREFECT_UI_API_URL": prefect_api_url(port)},
            port,
            "--port",
            "/api/health",
        ),
        Command(
            "mlflow",
            [
                py,
                "-m",
                "mlflow",
                "ui",
                "--host",
                HOST,
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{out / 'mlflow.db'}",
                "--artifacts-destination",
                str(out / "mlartifacts"),
            ],
            # no job runner: 8 more processes (trace scoring and archival, unused by npd), each
            # importing mlflow, made the UI answer after 56-71 s instead of 30 on a busy 2-core box
            {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            mlflow_port,
            "--mlflow-port",
            "/health",
        ),
    ]


def check_ports(cmds: list[Command]) -> None:
    """Raise one line naming the port and its option unless every service's port is distinct
    and free now. Bound as the servers bind (``SO_REUSEADDR``, as uvicorn and Prefect's own
    check do), so a port a closed connection left in TIME_WAIT counts as free."""
    seen: dict[int, Command] = {}
    for c in cmds:
        if c.port in seen:
            raise NPDError(
                f"{seen[c.port].flag} and {c.flag} are both {c.port}; give {c.flag} another port"
            )
        seen[c.port] = c
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, c.port))
            except OSError as e:
                why = (
                    "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror})"
                )
                raise NPDError(
                    f"port {c.port} on {HOST} {why}, so {c.name} cannot start there; "
                    f"choose another with `npd ui {c.flag} PORT`"
                ) from e


def start(out: Path, cmds: list[Command]) -> list[Service]:
    """Start every service, each in a new session, logging to ``<out>/logs/<name>.log``."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    services = []
    for c in cmds:
        log = logs / f"{c.name}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                c.argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **c.env},
                start_new_session=True,
            )
        services.append(Service(c, proc, log))
    return services


def healthy(url: str) -> bool:
    """Whether ``url`` answers 200 now (a refused or slow connection is not healthy)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(services: list[Service], stop: threading.Event, timeout: float) -> None:
    """Block until every service answers its health URL; one line naming the log otherwise."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending and not stop.is_set():
        for s in list(pending):
            if s.proc.poll() is not None:
                raise NPDError(f"{s.name} exited with code {s.proc.returncode}; see {s.log}")
            if healthy(s.command.health):
                pending.remove(s)
        if time.monotonic() > deadline:
            names = ", ".join(f"{s.name} ({s.command.health}, log {s.log})" for s in pending)
            raise NPDError(f"no answer within {timeout:.0f} s from {names}; a port may be in use")
        stop.wait(0.5)


def stop_all(services: list[Service], grace: float = 15.0) -> None:
    """SIGTERM each process group, SIGKILL what is left after ``grace`` seconds, reap."""
    for s in services:
        _signal_group(s.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for s in services:
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.proc.wait(max(0.1, deadline - time.monotonic()))
    while time.monotonic() < deadline and any(group_alive(s.proc.pid) for s in services):
        time.sleep(0.2)
    for s in services:
        _signal_group(s.proc.pid, signal.SIGKILL)
        s.proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still alive (zombies included until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def serve_ui(out: Path, port: int, mlflow_port: int, say: Callable[[str], None]) -> None:
    """Run both services until Ctrl-C/SIGTERM (or one of them exits), then stop both groups;
    a port that is taken is an error before either starts."""
    cmds = commands(out, port, mlflow_port)
    check_ports(cmds)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    services = start(out, cmds)
    try:
        wait_healthy(services, stop, HEALTH_TIMEOUT_S)
        if not stop.is_set():
            for s in services:
                say(f"{s.name}: {s.command.url}  (pid group {s.proc.pid}, log {s.log})")
            say(f"runs report to this server with: export PREFECT_API_URL={prefect_api_url(port)}")
            say("Ctrl-C stops both")
        while not stop.is_set():
            exited = [s for s in services if s.proc.poll() is not None]
            if exited:
                raise NPDError(
                    f"{exited[0].name} exited with code "
                    f"{exited[0].proc.returncode}; see {exited[0].log}"
                )
            stop.wait(1.0)
    finally:
        stop_all(services)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("stopped prefect and mlflow")
