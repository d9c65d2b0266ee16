"""A real Prefect server, served deployments and the checks that a resumed run lost nothing.

Shared by tests/flows/test_retry.py, tests/flows/test_crash.py and tests/ui (a pytest plugin,
loaded by tests/conftest.py). Everything here talks to real processes: ``prefect server start``
on a free loopback port, ``npd serve`` / ``npd run`` / ``npd retry`` as subprocesses, and the
Prefect REST API over HTTP, as the UI does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import prefect
import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file

from npd_core.atomic import atomic_file
from npd_core.servers import group_alive
from npd_core.store import STAGES, query
from tasks.tracking import copy_db

REPO = Path(__file__).resolve().parents[1]
NPD = [sys.executable, "-c", "from flows.cli import main; main()"]
ROUNDS = 2
STAGE_NAMES = ("generate", "score", "filter", "pack", "train", "evaluate")
# Columns that record when and by which Prefect run a row was written, not what it holds.
VOLATILE = ("flow_run_id", "task_run_id", "created_at")
# The tables a resumed run must reproduce, with the key that orders their rows.
TABLES = {
    "samples": "round, prompt_id, sample_idx",
    "filtered": "round, prompt_id, sample_idx",
    "checkpoints": "round",
    "evals": "round",
}
KEYS = {
    "samples": "run_id, round, prompt_id, sample_idx",
    "scores": "run_id, round, prompt_id, sample_idx",
    "filtered": "run_id, round, prompt_id, sample_idx",
    "checkpoints": "run_id, round",
    "evals": "run_id, round",
    "rounds": "run_id, round",
    "runs": "run_id",
}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ORPHAN_SCORES_SQL = """
SELECT count(*) FROM scores s ANTI JOIN samples g USING (run_id, round, prompt_id, sample_idx)
WHERE s.run_id = ?
"""


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session`` and every child it left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + 10
        while time.time() < deadline and group_alive(proc.pid):
            proc.poll()  # reap the leader, or the group never empties
            time.sleep(0.2)
        if not group_alive(proc.pid):
            break
    proc.wait(timeout=10)


@dataclass
class PrefectAPI:
    url: str  # http://127.0.0.1:<port>
    home: Path
    migrated_db: Path  # the server's database as it started: every migration run, no flow run

    def fresh_home(self, home: Path) -> Path:
        """A new PREFECT_HOME holding a copy of ``migrated_db``: a Prefect server started there
        (`npd run`'s ephemeral API, `npd ui`'s server) skips the migrations that a fresh
        database runs first (minutes on a busy 2-core box)."""
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.migrated_db, home / "prefect.db")
        return home

    def ephemeral_env(self, home: Path) -> dict[str, str]:
        """Environment additions for an npd process that runs its own ephemeral Prefect API, as
        a user without a server does: a ``fresh_home`` and room for a slow start of that API on
        a busy machine (the default 20 s is not always enough there)."""
        return {
            "PREFECT_HOME": str(self.fresh_home(home)),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        }

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def get(self, path: str) -> httpx.Response:
        return self._call("GET", path)

    def post(self, path: str, body: dict) -> httpx.Response:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """One request; a 503 (SQLite busy on a loaded box) is asked again, a few times."""
        for _ in range(10):
            r = httpx.request(method, f"{self.api}{path}", json=body, timeout=30)
            if r.status_code != 503:
                break
            time.sleep(1)
        return r


# Server services these tests do not need (schedules, automations, maintenance): less CPU.
IDLE_SERVICES = ("SCHEDULER", "FOREMAN", "TRIGGERS", "DB_VACUUM", "REPOSSESSOR", "EVENT_LOGGER")


@pytest.fixture(scope="session")
def prefect_api(request, tmp_path_factory) -> Iterator[PrefectAPI]:
    """``prefect server start`` on a free loopback port (its own PREFECT_HOME), shared by the
    session; the whole process group is stopped at the end.

    A fresh server database runs every Prefect migration (minutes on a busy 2-core box), so the
    first session keeps a migrated copy in pytest's cache and later sessions start from it; the
    session's other Prefect homes start from it too (``PrefectAPI.fresh_home``)."""
    home = tmp_path_factory.mktemp("prefect-server")
    migrated = tmp_path_factory.mktemp("prefect-migrated") / "prefect.db"
    cache = getattr(request.config, "cache", None)
    template = cache.mkdir(f"prefect-db-{prefect.__version__}") / "prefect.db" if cache else None
    if template is not None and template.is_file():
        shutil.copy(template, home / "prefect.db")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # the UI calls the API at this URL (without it: 127.0.0.1:4200, whatever --port says)
    env.update(PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    env.update({f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in IDLE_SERVICES})
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = PrefectAPI(f"http://127.0.0.1:{port}", home, migrated)
    try:
        deadline = time.time() + 900
        while True:
            try:
                if server.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log')}")
            time.sleep(0.5)
        _snapshot(home / "prefect.db", migrated)
        if template is not None and not template.is_file():
            _snapshot(migrated, template)
        yield server
    finally:
        stop_group(proc)
        log.close()


def _snapshot(db: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite database (WAL included), renamed into place."""
    with atomic_file(dest) as tmp:
        copy_db(db, tmp)


def npd_env(api: PrefectAPI, home: Path, **extra: str) -> dict[str, str]:
    """Environment of an npd subprocess reporting to ``api``: no inherited Prefect/npd/MLflow
    settings, its own PREFECT_HOME, a fast runner poll."""
    drop = ("PREFECT_", "NPD_", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        PREFECT_API_URL=api.api,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        NPD_COUNT_STAGES="1",
        NPD_ATTENTION="fixed",  # no timed kernel choice: results comparable across processes
        **extra,
    )
    return env


def npd(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NPD, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def write_config(folder: Path, world) -> Path:
    """A 2-round run on the tiny world, one torch thread, pinned student."""
    cfg = {
        "rounds": ROUNDS,
        "threads": 1,
        "models": {"teacher": str(world.teacher), "student": str(world.student)},
        "data": {
            "prompts": str(world.train_prompts),
            "eval_prompts": str(world.eval_prompts),
            "prompts_per_round": 32,
            "eval_size": 32,
        },
        "generate": {"max_new_tokens": 32},
        "train": {"steps_per_round": 3, "rows_per_step": 4, "epochs_per_round": 10},
        "pack": {"max_seq_len": 128},
        "eval": {"batch_size": 64},
        "schedule": {"pin_student": True},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Reference:
    out: Path
    run_id: str


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_world, prefect_api) -> Reference:
    """A clean `npd run` of the test config: what every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, tiny_world)
    env = npd_env(prefect_api, tmp / "prefect")
    res = npd("run", str(cfg), "--out", str(tmp / "out"), "--json", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return Reference(tmp / "out", only_run_id(tmp / "out"))


def only_run_id(out: Path) -> str:
    (run_id,) = query(out / "npd.duckdb", "select run_id from runs").column(0).to_pylist()
    return run_id


# ------------------------------------------------------------------ deployments and the API
@contextmanager
def served(api: PrefectAPI, config: Path, out: Path, name: str, **env_extra: str) -> Iterator[str]:
    """`npd serve CONFIG --out OUT --name NAME` in its own process group; yields the
    deployment id once the server knows it (the runner polls from then on)."""
    home = out.parent / f"prefect-{name}"
    env = npd_env(api, home, **env_extra)
    log = open(out.parent / f"serve-{name}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*NPD, "serve", str(config), "--out", str(out), "--name", name],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            r = api.get(f"/deployments/name/npd-scheduled/{name}")
            if r.status_code == 200:
                break
            assert proc.poll() is None, (out.parent / f"serve-{name}.log").read_text()[-3000:]
            assert time.time() < deadline, "npd serve did not register its deployment"
            time.sleep(0.5)
        yield r.json()["id"]
    finally:
        stop_group(proc)
        log.close()


def start_run(api: PrefectAPI, deployment_id: str) -> str:
    """A flow run of the deployment, as `prefect deployment run` or the UI's Run button."""
    r = api.post(f"/deployments/{deployment_id}/create_flow_run", {})
    r.raise_for_status()
    return r.json()["id"]


def flow_run(api: PrefectAPI, flow_run_id: str) -> dict:
    r = api.get(f"/flow_runs/{flow_run_id}")
    r.raise_for_status()
    return r.json()


def wait_final(api: PrefectAPI, flow_run_id: str, min_runs: int = 1, timeout: float = 600) -> dict:
    """The flow run once it is in a final state after at least ``min_runs`` executions."""
    deadline = time.time() + timeout
    while True:
        fr = flow_run(api, flow_run_id)
        if fr["state_type"] in FINAL and fr["run_count"] >= min_runs:
            return fr
        assert time.time() < deadline, f"flow run {flow_run_id} still {fr['state_name']}"
        time.sleep(1)


def retry_like_ui(api: PrefectAPI, flow_run_id: str) -> dict:
    """What the Retry dialog of Prefect 3.9's UI posts (ui-v2 ``setFlowRunState``)."""
    state = {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}
    r = api.post(f"/flow_runs/{flow_run_id}/set_state", {"state": state, "force": True})
    r.raise_for_status()
    return r.json()


def subflow_runs(api: PrefectAPI, parent_flow_run_id: str) -> list[str]:
    """Ids of the flow run's subflow runs (the distill flow), oldest first."""
    body = {
        "flow_runs": {"parent_flow_run_id": {"any_": [parent_flow_run_id]}},
        "sort": "EXPECTED_START_TIME_ASC",
    }
    return [f["id"] for f in api.post("/flow_runs/filter", body).json()]


def stage_states(api: PrefectAPI, flow_run_id: str) -> dict[tuple[str, int], str]:
    """(stage, round) → state name of the stage task runs of one flow run."""
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}
    found = {}
    for t in api.post("/task_runs/filter", body).json():
        head, _, stage = t["name"].partition("-")
        if stage in STAGE_NAMES and head[1:].isdigit():
            found[(stage, int(head[1:]))] = t["state"]["name"]
    return found


# ------------------------------------------------------------------ what a resumed run must hold
def all_stages() -> set[tuple[str, int]]:
    """Every (stage, round) of a run: θ_0's evaluation, then six stages per round."""
    return {("evaluate", 0)} | {(s, r) for s in STAGE_NAMES for r in range(1, ROUNDS + 1)}


def stage_counts(out: Path, run_id: str) -> Counter:
    """How many times each stage body ran (tasks/faults.py, NPD_COUNT_STAGES)."""
    path = out / "runs" / run_id / ".stage-count"
    lines = path.read_text().split() if path.exists() else []
    return Counter((s, int(r)) for s, r in zip(lines[::2], lines[1::2], strict=True))


def table(out: Path, run_id: str, name: str) -> pa.Table:
    """One view's rows of a run, ordered by key, without the volatile columns, with the run id
    written as ``<run>`` wherever it appears (paths under runs/<run_id>/)."""
    sql = f"select * from {name} where run_id = ? order by {TABLES[name]}"
    t = query(out / "npd.duckdb", sql, [run_id])
    t = t.drop_columns([c for c in VOLATILE if c in t.column_names])
    cols = []
    for c in t.columns:
        if pa.types.is_string(c.type):
            c = pa.chunked_array(
                [[None if v is None else v.replace(run_id, "<run>") for v in c.to_pylist()]],
                type=c.type,
            )
        cols.append(c)
    return pa.table(cols, names=t.column_names)


def assert_same_as_reference(out: Path, run_id: str, ref: Reference) -> dict[str, int]:
    """Tables equal row for row (volatile columns aside) and every checkpoint's weights equal;
    returns the row counts compared."""
    counts = {}
    for name in TABLES:
        mine, theirs = table(out, run_id, name), table(ref.out, ref.run_id, name)
        assert mine.num_rows > 0 and mine.column_names == theirs.column_names, name
        for col in mine.column_names:
            assert mine.column(col).equals(theirs.column(col)), f"{name}.{col} differs"
        counts[name] = mine.num_rows
    for r in range(1, ROUNDS + 1):
        a = load_file(out / "runs" / run_id / "checkpoints" / f"round={r}" / "model.safetensors")
        b = load_file(
            ref.out / "runs" / ref.run_id / "checkpoints" / f"round={r}" / "model.safetensors"
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"θ_{r}"
    return counts


def assert_nothing_duplicated_or_orphaned(out: Path, run_id: str) -> None:
    """No key twice in any view, no row without its sample, no shard or checkpoint folder that
    the tables do not name, and no temp/trash leftovers anywhere in the run."""
    db = out / "npd.duckdb"
    for name, key in KEYS.items():
        sql = f"select count(*) n, count(distinct ({key})) k from {name} where run_id = ?"
        got = query(db, sql, [run_id]).to_pylist()[0]
        assert got["n"] == got["k"] > 0, f"{name}: {got}"
    orphans = query(db, ORPHAN_SCORES_SQL, [run_id]).column(0).to_pylist()
    assert orphans == [0]
    run_dir = out / "runs" / run_id
    want = {"round=0/evaluate"} | {f"round={r}/{s}" for r in range(1, ROUNDS + 1) for s in STAGES}
    have = {f"{d.parent.name}/{d.name}" for d in run_dir.glob("round=*/*")}
    assert have == want, have ^ want
    ckpts = {d.name for d in (run_dir / "checkpoints").iterdir()}
    assert ckpts == {f"round={r}" for r in range(1, ROUNDS + 1)}, ckpts
    named = query(db, "select path from checkpoints where run_id = ? and round > 0", [run_id])
    assert {Path(p).name for p in named.column(0).to_pylist()} == ckpts
    for d in (run_dir / "checkpoints").iterdir():
        files = {f.name for f in d.iterdir()}
        assert {"model.safetensors", "config.json"} <= files
        # the optimizer state of the last round only (npd_core.pipeline.retention)
        assert ("trainer_state.pt" in files) == (d.name == f"round={ROUNDS}"), (d, files)
    leftovers = [p for p in run_dir.rglob(".*") if p.name not in _OWN_MARKERS]
    assert leftovers == [], leftovers


_OWN_MARKERS = {".faults", ".stage-count", ".lease.json"}


def run_status(out: Path, run_id: str, env: dict[str, str]) -> dict:
    """`npd status RUN --json`'s one run."""
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
