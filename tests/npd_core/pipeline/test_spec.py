"""RunSpec (npd_core/pipeline/spec.py): where a run's checkpoints live, its recorded threads."""

from __future__ import annotations

import json
import os

from npd_core.config import NPDConfig
from npd_core.pipeline.spec import RunSpec


def test_runspec_checkpoint_layout(tmp_path):
    spec = RunSpec(str(tmp_path), "x", {}, "t", "s0", "a", "b")
    assert spec.checkpoint(0) == "s0"
    assert spec.checkpoint(2).endswith(os.path.join("runs", "x", "checkpoints", "round=2"))


def test_stage_threads_are_recorded_at_the_start_and_kept_by_a_retry(tmp_path, monkeypatch):
    """A new run records its stages' threads (the config's rule on this machine); its retry on a
    machine with other cores keeps them; a spec written before threads were recorded keeps
    resolving them as it did."""
    cfg = {"staleness": 1}
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    new = RunSpec(str(tmp_path), "x", cfg, "t", "s0", "a", "b").with_threads()
    assert new.threads == NPDConfig.model_validate(cfg).stage_threads(concurrent=True) == 4
    new.save()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    again = RunSpec.load(tmp_path, "x")
    assert again.with_threads() == again and again.stage_threads() == 4
    old = json.loads(RunSpec.path(tmp_path, "x").read_text())
    del old["threads"]
    old["attention"] = {}  # what a spec of the kernel-choice era holds
    RunSpec.path(tmp_path, "x").write_text(json.dumps(old))
    legacy = RunSpec.load(tmp_path, "x")
    assert legacy.threads is None and legacy.with_threads().threads is None
    assert legacy.stage_threads() == 1  # resolved here: 2 cores, two stages
    pinned = RunSpec(str(tmp_path), "y", {"threads": 3}, "t", "s0", "a", "b").with_threads()
    assert pinned.threads == 3
