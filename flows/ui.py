"""``npd ui``: a local Prefect server and the MLflow UI over one output directory, stopped
together on Ctrl-C or SIGTERM.

Each service starts in its own session (so its own process group) and is stopped by signalling
the whole group: ``prefect server start`` runs the API in a child process that outlives a signal
sent to its own pid only, and the MLflow UI runs its web workers as children too.
"""

from __future__ import annotations

import contextlib
import os
import signal
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


@dataclass
class Service:
    name: str
    url: str  # what a person opens
    health: str  # answers 200 once the service is up
    proc: subprocess.Popen
    log: Path


def commands(out: Path, port: int, mlflow_port: int) -> dict[str, tuple[list[str], str, str]]:
    """name → (argv, UI url, health url); the MLflow store and artifacts are the output dir's."""
    out = out.resolve()
    py = sys.executable
    prefect_url, mlflow_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mlflow_port}"
    return {
        "prefect": (
            [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            prefect_url,
            f"{prefect_url}/api/health",
        ),
        "mlflow": (
            [
                py,
                "-m",
                "mlflow",
                "ui",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{out / 'mlflow.db'}",
                "--artifacts-destination",
                str(out / "mlartifacts"),
            ],
            mlflow_url,
            f"{mlflow_url}/health",
        ),
    }


def start(out: Path, port: int, mlflow_port: int) -> list[Service]:
    """Start both services, each in a new session, logging to ``<out>/logs/<name>.log``."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    services = []
    for name, (argv, url, health) in commands(out, port, mlflow_port).items():
        log = logs / f"{name}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        services.append(Service(name, url, health, proc, log))
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
            if healthy(s.health):
                pending.remove(s)
        if time.monotonic() > deadline:
            names = ", ".join(f"{s.name} ({s.health}, log {s.log})" for s in pending)
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
    """Run both services until Ctrl-C/SIGTERM (or one of them exits), then stop both groups."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    services = start(out, port, mlflow_port)
    try:
        wait_healthy(services, stop, HEALTH_TIMEOUT_S)
        if not stop.is_set():
            for s in services:
                say(f"{s.name}: {s.url}  (pid group {s.proc.pid}, log {s.log})")
            say(f"runs report to this server with: export PREFECT_API_URL={services[0].url}/api")
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
