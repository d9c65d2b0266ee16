"""The filter study's stages on disk (``<out>/filter-study/<stage>.json``): which cells a stage
runs, the JSON a finished cell is saved to at once (so an interrupted stage resumes where it
stopped) and the stage's report. The cells and the decision rule: :mod:`filter_study`."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from npd_core.atomic import atomic_file
from npd_core.bench import filter_study as fs
from npd_core.bench.harness import Hyper
from npd_core.errors import ConfigError
from npd_core.jsonsafe import finite

PLOT_STALENESS = 4  # the report's plot: each rule's mean curve at this staleness


def stage_cells(stage: str, folder: Path) -> list[fs.Cell]:
    """The screen's cells, or the confirm stage's (from the finished screen's best rules);
    confirming before the screen is complete is a one-line error."""
    if stage == "screen":
        return fs.screen_cells()
    screen = load(folder / "screen.json")
    names = {x.name for x in fs.screen_cells()}
    done = [c for c in screen.get("cells", []) if c["name"] in names]
    if len(done) < len(names):
        raise ConfigError(
            f"{folder / 'screen.json'}: the screen has {len(done)} of "
            f"{len(names)} cells; run `npd bench filter --stage screen` first"
        )
    return fs.confirm_cells(fs.confirm_rules(done))


def report(stage: str, budget_s: float, hyper: Hyper, done: list[dict[str, Any]]) -> dict[str, Any]:
    """A finished stage: its summary, and the screen's rules to confirm or the decision."""
    out: dict[str, Any] = {
        "stage": stage,
        "budget_s": budget_s,
        "hyperparameters": asdict(hyper),
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "summary": fs.summary(done),
        "cells": done,
    }
    if stage == "screen":
        out["confirm_rules"] = fs.confirm_rules(done)
    else:
        out["decision"] = fs.decide(done)
    return out


def plotted_means(done: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Each rule's mean score by round over its seeds at ``PLOT_STALENESS``."""
    return {
        rule: fs.mean_by_round(
            [c for c in done if c["rule"] == rule and c["staleness"] == PLOT_STALENESS]
        )
        for rule in dict.fromkeys(c["rule"] for c in done)
    }


def load(path: Path) -> dict[str, Any]:
    """A stage's saved JSON, or nothing yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, data: dict[str, Any]) -> None:
    """Write a stage's JSON in one rename (strict JSON: non-finite numbers as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(finite(data), indent=1))
