"""RunSpec (npd_core/pipeline/spec.py): where a run's checkpoints live."""

from __future__ import annotations

import os

from npd_core.pipeline.spec import RunSpec


def test_runspec_checkpoint_layout(tmp_path):
    spec = RunSpec(str(tmp_path), "x", {}, "t", "s0", "a", "b")
    assert spec.checkpoint(0) == "s0"
    assert spec.checkpoint(2).endswith(os.path.join("runs", "x", "checkpoints", "round=2"))
