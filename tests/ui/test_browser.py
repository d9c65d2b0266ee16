"""A real browser: headless Debian chromium (driven by playwright-core from npm) clicks Retry on
a failed deployment run in Prefect's own UI, and the run completes where it failed; and `npd ui`
on ports other than the defaults serves a Prefect UI that reaches its own API (a run's summary
artifact renders its table) beside an MLflow UI that lists the run's experiment.

Needs `apt-get install chromium` and `npm ci --prefix tests/ui` (no browser download: the
browser comes from Debian). Screenshots go to ``<tmp>/ui/`` (path printed; run with -s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from resume_checks import (
    IDLE_SERVICES,
    NPD,
    REPO,
    assert_nothing_duplicated_or_orphaned,
    assert_same_as_reference,
    free_port,
    only_run_id,
    served,
    stage_counts,
    start_run,
    stop_group,
    wait_final,
    write_config,
)

from npd_core.servers import healthy
from npd_core.store import query
from tasks.artifacts import key
from tasks.tracking import EXPERIMENT, copy_db

HERE = Path(__file__).parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TIMEOUT_S = 600
EVALS_SQL = "select round, eval_set, score from evals where run_id = ? order by round, eval_set"


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if shutil.which("node") is None:
        return "no node on PATH (apt-get install nodejs npm)"
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        return f"no playwright-core in {HERE}/node_modules (npm ci --prefix {HERE})"
    return None


pytestmark = [pytest.mark.ui, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def test_retry_button_in_prefect_ui_resumes_the_failed_round(
    tmp_path, tiny_world, prefect_api, reference
):
    out = tmp_path / "out"
    shots = tmp_path / "ui"
    shots.mkdir()
    cfg = write_config(tmp_path, tiny_world)
    with served(prefect_api, cfg, out, "ui-retry", NPD_FAIL_AT="train:2") as dep:
        run = start_run(prefect_api, dep)
        assert wait_final(prefect_api, run)["state_type"] == "FAILED"
        browser = subprocess.run(
            ["node", str(HERE / "retry_in_ui.mjs"), prefect_api.url, run, str(shots)]
            + [str(TIMEOUT_S)],
            capture_output=True,
            text=True,
            cwd=HERE,
            timeout=TIMEOUT_S + 120,
        )
    assert browser.returncode == 0, browser.stderr[-3000:] + browser.stdout[-2000:]
    steps = {s["step"]: s for s in map(json.loads, browser.stdout.splitlines())}
    assert steps["opened"]["state"] == "Failed"
    assert steps["finished"] == {"step": "finished", "state": "Completed", "run_count": 2}
    print(f"\nscreenshots: {shots}")
    for name in ("retry-dialog", "flow-run", "distill-subflow"):
        assert (shots / f"{name}.png").stat().st_size > 10_000

    run_id = only_run_id(out)
    counts = stage_counts(out, run_id)
    assert counts[("train", 2)] == 2 and counts[("generate", 1)] == 1  # round 1 not redone
    assert_same_as_reference(out, run_id, reference)
    assert_nothing_duplicated_or_orphaned(out, run_id)


def test_npd_ui_on_other_ports_renders_the_run_summary_and_lists_its_experiment(
    tmp_path, prefect_api, reference
):
    """`npd ui` over a copy of the reference run's output directory, its Prefect server on a copy
    of the database the run reported to, neither on a default port, with a PREFECT_API_URL in
    the caller's environment that names another server."""
    out, home, shots = tmp_path / "out", tmp_path / "prefect-home", tmp_path / "ui"
    shutil.copytree(reference.out, out)
    home.mkdir()
    shots.mkdir()
    copy_db(prefect_api.home / "prefect.db", home / "prefect.db")
    port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in IDLE_SERVICES})
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    api = f"http://127.0.0.1:{port}/api"
    stderr = tmp_path / "npd-ui.log"
    with open(stderr, "w") as log:
        ui = subprocess.Popen(
            [*NPD, "ui", "--out", str(out), "--port", str(port), "--mlflow-port", str(mlflow_port)],
            stderr=log,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops both" not in stderr.read_text():  # printed once both answer
            assert ui.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.5)
        assert f"export PREFECT_API_URL={api}\n" in stderr.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/ui-settings").json()["api_url"] == api
        summary = _latest_artifact(api, key(reference.run_id, "summary"))
        browser = subprocess.run(
            ["node", str(HERE / "npd_ui.mjs"), f"http://127.0.0.1:{port}", summary["id"]]
            + [f"http://127.0.0.1:{mlflow_port}", EXPERIMENT, str(shots)],
            capture_output=True,
            text=True,
            cwd=HERE,
            timeout=240,
        )
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=60) == 0, stderr.read_text()
    finally:
        if ui.poll() is None:
            stop_group(ui)
    assert browser.returncode == 0, browser.stderr[-3000:] + browser.stdout[-2000:]
    steps = {s["step"]: s for s in map(json.loads, browser.stdout.splitlines())}
    print(f"\nscreenshots: {shots}")
    assert steps["summary"]["heading"] == [f"npd run {reference.run_id}"]
    rows = steps["summary"]["rows"]
    assert rows == _markdown_table(summary["data"])
    # the page's score of every round on every eval set is the store's
    sets = [h.removesuffix(" (primary)") for h in rows[0]]
    evals = query(out / "npd.duckdb", EVALS_SQL, [reference.run_id]).to_pylist()
    assert {e["round"] for e in evals} == set(range(len(rows) - 1))
    for e in evals:
        cells = rows[1 + e["round"]]
        assert cells[0] == str(e["round"])
        assert float(cells[sets.index(e["eval_set"])]) == pytest.approx(e["score"], rel=1e-3)
    assert steps["mlflow"] == {"step": "mlflow", "experiment": "npd"}
    for name in ("summary", "mlflow"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
    assert not healthy(f"{api}/health") and not healthy(f"http://127.0.0.1:{mlflow_port}/health")


def _latest_artifact(api: str, artifact_key: str) -> dict:
    """The newest artifact under ``artifact_key`` (its own id: the page the UI links to)."""
    body = {"artifacts": {"key": {"any_": [artifact_key]}}, "sort": "CREATED_DESC", "limit": 1}
    r = httpx.post(f"{api}/artifacts/filter", json=body, timeout=30)
    r.raise_for_status()
    (artifact,) = r.json()
    return artifact


def _markdown_table(markdown: str) -> list[list[str]]:
    """The cells of a markdown table's rows (header first, the |---| line left out)."""
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in lines
        if not set(line) <= set("|-: ")
    ]
