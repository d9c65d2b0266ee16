"""Did a run's rounds teach the student its own distillation prompts? Greedy points, by task, of
a smol world's warm start and of a run's checkpoints on the world's train prompts (those the
rounds sampled), where the held-out score cannot show what the rounds taught; ``--prompts eval``
splits the held-out score by task instead.

    .venv/bin/python scripts/smol_trained_prompts.py WORLD_DIR CHECKPOINT_DIR... > trained.json

A probe for choosing the smol world's next spec, not part of the pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from npd_core.data import Prompt
from npd_core.models import load_model, load_tokenizer
from npd_core.toy.smol import SmolSpec, per_task, score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", type=Path, help="a built smol world (toy/smol-<hash>)")
    ap.add_argument("checkpoints", type=Path, nargs="+", help="a run's checkpoints/round=K")
    ap.add_argument("--prompts", choices=("train", "eval"), default="train")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = [json.loads(line) for line in (a.world / f"{a.prompts}.jsonl").open()]
    prompts = [Prompt(r["id"], r["prompt"], r["answer"]) for r in rows]
    tok = load_tokenizer(a.world / "student")
    report = {}
    for path in (a.world / "student", *a.checkpoints):
        points, texts = score(load_model(path).eval(), tok, prompts, SmolSpec())
        name = "warm_start" if path == a.world / "student" else path.name
        report[name] = {"score": round(points, 1), "per_task": per_task(prompts, texts)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
