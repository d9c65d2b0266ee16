"""From a validated config to a ``RunSpec``: the toy world fills in what the config leaves out,
and every input is checked before anything is written for the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from npd_core.config import NPDConfig
from npd_core.preflight import check_run
from npd_core.store import Store
from npd_core.toy import ToyWorld, build_toy_world


def resolve_spec(
    cfg: NPDConfig, out: Path, run_id: str, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], ToyWorld | None]:
    """The run's spec as plain data (and the toy world when the config leaves a model or a
    prompt file out); raises a one-line NPDError on a bad input. Without the toy world nothing
    is written before the checks pass; with it, the store is opened first (the world lives in it).
    """
    given = (cfg.models.teacher, cfg.models.student, cfg.data.prompts, cfg.data.eval_prompts)
    paths = dict(zip(("teacher", "student", "train_prompts", "eval_prompts"), given, strict=True))
    world = None
    if not all(given):
        Store(out)
        world = build_toy_world(out / "toy", log=log)
        paths = {k: v or str(getattr(world, k)) for k, v in paths.items()}
    check_run(cfg, *paths.values())
    Store(out)
    spec = dict(root=str(out), run_id=run_id, config=cfg.model_dump(mode="json"), **paths)
    return spec, world
