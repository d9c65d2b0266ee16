"""From a validated config to a ``RunSpec``: an embedded world (the toy by default, or ``long``)
fills in what the config leaves out, and every input is checked before anything is written for
the run. Plain library code: ``npd demo``/``npd run``, the scheduled flow and the bench call it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from npd_core.atomic import atomic_file
from npd_core.config import NPDConfig
from npd_core.data import Prompt, reads_as_is, write_prompts
from npd_core.errors import ConfigError, DataError
from npd_core.modelio import GGUF_CACHE, local_model
from npd_core.pipeline.preflight import check_backends, check_run
from npd_core.pipeline.spec import RunSpec
from npd_core.store import Store
from npd_core.store.lineage import used_prompt_ids
from npd_core.toy.world import (
    WORLDS,
    BuildProgress,
    ToyWorld,
    WorldSpec,
    build_toy_world,
    world_spec,
)


def new_run_id() -> str:
    """npd's own run id: when it was made, readable, and a random suffix."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def resolve_spec(
    cfg: NPDConfig,
    out: Path,
    run_id: str,
    log: Callable[[str], None] = print,
    world: str = "toy",
    progress: BuildProgress | None = None,
) -> tuple[dict[str, Any], ToyWorld | None]:
    """The run's spec as plain data (and the embedded world ``world`` when the config leaves a
    model or a prompt file out); raises a one-line NPDError on a bad input. Without the world
    nothing is written before the checks pass; with it, the store is opened first (the world lives
    in it), and ``cfg`` takes the world's config defaults where it sets no value of its own
    (``apply_world_defaults``: the long world's response cap, row length and metric)."""
    ws = use_world(cfg, world)
    primary = cfg.eval.primary_set
    paths = _given(cfg)
    built = None
    check_backends(cfg)  # before the world: building it takes minutes
    if ws is not None:
        Store(out)
        built = build_toy_world(out / "toy", ws, log=log, progress=progress)
        paths = {k: v or str(getattr(built, k)) for k, v in paths.items()}
    for role in ("teacher", "student"):  # a .gguf file runs as its plain checkpoint, made once
        paths[role] = local_model(paths[role], out / GGUF_CACHE)
    sets = dict(cfg.eval.sets) or {primary: paths["eval_prompts"]}
    teacher, student, train = paths["teacher"], paths["student"], paths["train_prompts"]
    prompts, evals = check_run(cfg, teacher, student, train, sets)
    Store(out)
    if cfg.schedule.skip_used_prompts or not reads_as_is(paths["train_prompts"], cfg.data):
        frozen = _freeze_prompts(prompts, cfg, paths["train_prompts"], out, run_id)
        paths["train_prompts"] = str(frozen)
    for name, path in sets.items():
        if not reads_as_is(path, cfg.data):
            file = "eval_prompts" if name == primary else f"eval_prompts-{name}"
            sets[name] = str(freeze(evals[name], out, run_id, file))
    paths["eval_prompts"] = sets[primary]  # what reads one held-out set (the bench, peers)
    spec = dict(
        root=str(out),
        run_id=run_id,
        config=cfg.model_dump(mode="json"),
        eval_set_paths=sets,
        **paths,
    )
    return spec, built


def _given(cfg: NPDConfig) -> dict[str, str | None]:
    """The models and prompt files the config names itself (None where it leaves one out)."""
    held_out = cfg.data.eval_prompts or cfg.eval.sets.get(cfg.eval.primary_set)
    given = (cfg.models.teacher, cfg.models.student, cfg.data.prompts, held_out)
    return dict(zip(("teacher", "student", "train_prompts", "eval_prompts"), given, strict=True))


def use_world(cfg: NPDConfig, world: str) -> WorldSpec | None:
    """The embedded world's spec if the run uses it (the config leaves a model or a prompt file
    out), with its config defaults set on ``cfg``; None if the config names everything. Call it
    before reading the method's settings (the bench's ablations are relative to them)."""
    if world not in WORLDS:
        raise ConfigError(f"--world {world}: unknown world; choose from {', '.join(WORLDS)}")
    if all(_given(cfg).values()):
        return None
    ws = world_spec(world)
    apply_world_defaults(cfg, ws.config_defaults())
    return ws


def apply_world_defaults(cfg: NPDConfig, defaults: dict[str, dict[str, Any]]) -> None:
    """Set ``defaults`` (section → field → value) on ``cfg`` in place, except the fields the
    config gave itself (a YAML or an override that names a field keeps its value)."""
    for name, values in defaults.items():
        section = getattr(cfg, name)
        for key, value in values.items():
            if key not in section.model_fields_set:
                setattr(section, key, value)


def _freeze_prompts(
    prompts: list[Prompt], cfg: NPDConfig, source: str, out: Path, run_id: str
) -> Path:
    """The run's own copy of its train prompts (the glob's files or the dataset as of now, minus
    the ids earlier runs used when ``schedule.skip_used_prompts``), so a retry sees the same
    prompts however the folder grows."""
    if cfg.schedule.skip_used_prompts:
        used = used_prompt_ids(out, except_run=run_id)
        prompts = [p for p in prompts if p.id not in used]
        if not prompts:
            raise DataError(
                f"data.prompts: every prompt of {source} was used by an earlier run in "
                f"{out}; add new prompt files or set schedule.skip_used_prompts: false"
            )
    return freeze(prompts, out, run_id, "train_prompts")


def freeze(prompts: list[Prompt], out: Path, run_id: str, name: str) -> Path:
    """``runs/<run_id>/run/<name>.jsonl``: a prompt set as npd's own JSONL, which every stage,
    retry and resume reads with the default options, whatever form and field names the
    user's set has (Parquet, a folder of shards, a save_to_disk folder, a glob)."""
    path = RunSpec.path(out, run_id).with_name(f"{name}.jsonl")
    with atomic_file(path) as tmp:
        write_prompts(tmp, prompts)
    return path
