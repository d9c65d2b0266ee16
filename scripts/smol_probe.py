"""What the smol world's probe scripts share: their ``--out``/``--json`` options and the current
spec's world, built or reused, with the tokenizer its models share. Not part of the pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from npd_core.models import load_tokenizer
from npd_core.toy.world import ToyWorld, build_toy_world, world_spec


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("npd-out/smol"))
    ap.add_argument("--json", action="store_true")
    return ap


def current_world(out: Path) -> tuple[ToyWorld, Any]:
    """The world ``SmolSpec()`` names under ``out/toy`` (built if missing), on two threads."""
    torch.set_num_threads(2)
    world = build_toy_world(
        out / "toy", world_spec("smol"), log=lambda m: print(m, file=sys.stderr)
    )
    return world, load_tokenizer(world.student)
