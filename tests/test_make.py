"""The Makefile's entry points as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_make_demo_json_prints_only_the_json_on_stdout(tmp_path):
    """`make demo ARGS=--json` gives stdout exactly the JSON object of `npd demo --json`: make's
    recipe lines were echoed on stdout before it. A stand-in `npd` (BIN=…) prints its
    arguments as JSON; being newer than pyproject.toml, it needs no setup."""
    npd = tmp_path / "npd"
    npd.write_text('#!/bin/sh\necho "{\\"argv\\": \\"$*\\"}"\n')
    npd.chmod(0o755)
    # as from a shell: a make run inside another (`make test`) names its directory on stdout
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    res = subprocess.run(
        ["make", "demo", "ARGS=--json", f"BIN={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"argv": "demo --json"}
