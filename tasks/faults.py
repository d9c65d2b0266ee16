"""Fault injection for rehearsing a failure and its retry: ``NPD_FAIL_AT=<stage>[:<round>]``
makes that stage raise once per run. The first failure is remembered in the output directory,
so the retried flow run goes through."""

from __future__ import annotations

import os
from pathlib import Path

from npd_core.stages import RunSpec


class InjectedFault(RuntimeError):
    """Raised on purpose by NPD_FAIL_AT."""


def maybe_fail(spec: RunSpec, stage: str, r: int) -> None:
    want = os.environ.get("NPD_FAIL_AT", "")
    if not want:
        return
    name, _, rnd = want.partition(":")
    if name != stage or (rnd and int(rnd) != r):
        return
    mark = Path(spec.root) / "runs" / spec.run_id / ".faults" / f"{stage}-r{r}"
    if mark.exists():
        return
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.touch()
    raise InjectedFault(f"NPD_FAIL_AT={want}: injected failure in {stage} of round {r}")
