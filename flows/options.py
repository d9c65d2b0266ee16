"""CLI options shared by `npd` (flows/cli.py) and `npd bench` (flows/bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
OutOpt = Annotated[
    Path, typer.Option("--out", help="output directory (store, MLflow, checkpoints)")
]
# `npd bench` commands whose output directory only caches the embedded world
WorldOutOpt = Annotated[
    Path, typer.Option("--out", help="output directory holding the world cache")
]
BenchConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="run config YAML (default: toy world)")
]
