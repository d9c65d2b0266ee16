"""From a validated config to a ``RunSpec``: the toy world fills in what the config leaves out,
and every input is checked before anything is written for the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from npd_core.config import NPDConfig
from npd_core.preflight import check_run
from npd_core.store import Store
from npd_core.toy import ToyWorld


def resolve_spec(
    cfg: NPDConfig, out: Path, run_id: str, world: ToyWorld | None = None
) -> dict[str, Any]:
    """The run's spec as plain data; raises a one-line NPDError on a bad input."""
    paths = {
        "teacher": cfg.models.teacher or (world and str(world.teacher)),
        "student": cfg.models.student or (world and str(world.student)),
        "train_prompts": cfg.data.prompts or (world and str(world.train_prompts)),
        "eval_prompts": cfg.data.eval_prompts or (world and str(world.eval_prompts)),
    }
    check_run(cfg, *paths.values())
    Store(out)
    return dict(root=str(out), run_id=run_id, config=cfg.model_dump(mode="json"), **paths)
