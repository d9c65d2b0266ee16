"""A real browser: headless Debian chromium (driven by playwright-core from npm) opens a failed
deployment run in Prefect's own UI, clicks Retry, and the run completes where it failed.

Needs `apt-get install chromium` and `npm ci --prefix tests/ui` (no browser download: the
browser comes from Debian). Screenshots go to ``<tmp>/ui/`` (path printed; run with -s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from resume_checks import (
    assert_nothing_duplicated_or_orphaned,
    assert_same_as_reference,
    only_run_id,
    served,
    stage_counts,
    start_run,
    wait_final,
    write_config,
)

HERE = Path(__file__).parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TIMEOUT_S = 600


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
