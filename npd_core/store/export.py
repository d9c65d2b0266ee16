"""``npd export``'s writing half: one checkpoint of a run as a plain HF model directory (config,
weights, tokenizer), which ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load
without npd. No optimizer or RNG state goes along; ``npd-export.json`` says where the weights
came from. Registering it in the MLflow Model Registry needs MLflow, so the command does that."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from npd_core.atomic import atomic_dir
from npd_core.errors import StoreUsageError
from npd_core.store.lineage import Checkpoint, checkpoint

PROVENANCE = "npd-export.json"


def parse_round(value: str) -> int | None:
    """``best`` → None (the run's best evaluated checkpoint), else a round number ≥ 0."""
    if value == "best":
        return None
    if value.isdigit():
        return int(value)
    raise StoreUsageError(f"--round {value!r}: give 'best' or a round number (0 = θ_0)")


def export_checkpoint(root: Path, run_id: str, round: int | None, dest: Path) -> dict[str, Any]:
    """Write θ_round of ``run_id`` to ``dest`` (new or empty) in one rename; returns provenance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreUsageError(f"{dest}: exists and is not empty; give a new or empty directory")
    ck = checkpoint(root, run_id, round)
    info = provenance(ck, best=round is None)
    with atomic_dir(dest) as tmp:
        AutoModelForCausalLM.from_pretrained(ck.path).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(ck.path).save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=1) + "\n")
    return {**info, "dir": str(dest.resolve())}


def provenance(ck: Checkpoint, best: bool) -> dict[str, Any]:
    """Where an exported or registered checkpoint came from: run, round, score, source path."""
    return dict(
        run_id=ck.run_id,
        round=ck.round,
        eval_set=ck.eval_set,
        metric=ck.metric,
        score=ck.score,
        source=str(ck.path),
        best=best,
    )
