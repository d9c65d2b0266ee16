"""Rehearsing failures, for tests and for users who want to see a retry work.

- ``NPD_FAIL_AT=<stage>[:<round>][,<stage>[:<round>]…]`` makes each listed stage raise once per
  run. A failure is remembered in the output directory, so the retried flow run goes past it
  (to the next listed stage, if any).
- ``NPD_COUNT_STAGES=1`` makes every stage body append ``<stage> <round>`` to
  ``runs/<run_id>/.stage-count``: a stage that came back ``Cached`` adds no line, one that ran
  adds one, so a test can count executions across processes and retries.
- ``NPD_PAUSE_AT`` (see ``npd_core.crashpoints``) stops the process at a given point to be killed.
"""

from __future__ import annotations

import os
from pathlib import Path

from npd_core.pipeline.spec import RunSpec

COUNT_FILE = ".stage-count"


class InjectedFault(RuntimeError):
    """Raised on purpose by NPD_FAIL_AT."""


def enter_stage(spec: RunSpec, stage: str, r: int) -> None:
    """First call of every stage task body: count the execution, then fail if asked to."""
    run_dir = Path(spec.root) / "runs" / spec.run_id
    if os.environ.get("NPD_COUNT_STAGES"):
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / COUNT_FILE, "a", encoding="utf-8") as f:  # one short append
            f.write(f"{stage} {r}\n")
    for want in filter(None, os.environ.get("NPD_FAIL_AT", "").split(",")):
        name, _, rnd = want.strip().partition(":")
        if name != stage or (rnd and int(rnd) != r):
            continue
        mark = run_dir / ".faults" / f"{stage}-r{r}"
        if mark.exists():
            return
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        raise InjectedFault(f"NPD_FAIL_AT={want}: injected failure in {stage} of round {r}")
