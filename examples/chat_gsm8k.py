"""The docs' worked example (data-and-eval.md), runnable without a download: writes into DIR
the files a user brings (stand-ins for them) and the config that distils with them.

    DIR/teacher, DIR/student  tiny random Llama checkpoints sharing a byte-level tokenizer whose
                              Jinja chat template has a system turn (your own HF checkpoints
                              take their place)
    DIR/train.parquet         conversational rows in TRL's format: system, user, and the
                              assistant's worked answer ending in "#### N"
    DIR/gsm8k-test            a datasets save_to_disk folder, GSM8K's columns: question, answer
                              ("... #### 1,234"), id
    DIR/hard.jsonl            a second eval set: conversations with larger numbers
    DIR/my.yaml               the run's config (as printed in docs/data-and-eval.md)

Usage: python examples/chat_gsm8k.py DIR, then npd run DIR/my.yaml --out OUT.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = [
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|pad|>",
]
# Llama 3's layout: every turn under a role header, closed by <|eot_id|> (also the EOS)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SYSTEM = "You are a careful math tutor. Answer in one line, then #### and the number."
QUESTION = "{name} has {a:,} marbles and wins {b:,} more. How many marbles does {name} have now?"
NAMES = ("Ada", "Bo", "Cy", "Dee", "Eli", "Fay")
CONFIG = """\
name: gsm8k-chat
rounds: 2
models:
  teacher: teacher  # your teacher's HF checkpoint folder (relative to this file)
  student: student  # your student's; both share one tokenizer
data:
  prompts: train.parquet  # conversational rows: the 'messages' column
  prompt_field: question  # gsm8k-test's prompt column (rows without it use 'messages')
  prompts_per_round: 32
generate:
  max_new_tokens: 24
pack:
  max_seq_len: 320
train:
  steps_per_round: 4
  rows_per_step: 4
eval:
  metric: gsm8k  # the number after ####, commas removed, compared as a number
  sets:
    gsm8k: gsm8k-test  # a save_to_disk folder
    hard: hard.jsonl
  primary: gsm8k  # the set that picks the best checkpoint
"""


def chat_tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per byte (any text encodes) plus Llama 3's specials: 261 tokens."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[1],
        pad_token=SPECIALS[4],
        additional_special_tokens=SPECIALS[2:4],
    )
    out.chat_template = template
    return out


def save_llama(path: Path, hidden: int, layers: int, seed: int) -> Path:
    """A random tiny Llama checkpoint with ``chat_tokenizer`` saved beside it."""
    tok = chat_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def problems(n: int, high: int, seed: int) -> list[tuple[str, str]]:
    """(question, worked answer ending in "#### N") pairs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, name = rng.randrange(10, high), rng.randrange(10, high), rng.choice(NAMES)
        question = QUESTION.format(name=name, a=a, b=b)
        out.append((question, f"{a:,} + {b:,} = {a + b:,}\n#### {a + b:,}"))
    return out


def conversation(question: str, answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": answer}] if answer else [])


def write_example(root: Path) -> Path:
    """Every file of the example under ``root``; returns the config's path."""
    root.mkdir(parents=True, exist_ok=True)
    save_llama(root / "teacher", hidden=64, layers=2, seed=1)
    save_llama(root / "student", hidden=32, layers=2, seed=2)
    train = [{"messages": conversation(q, a)} for q, a in problems(64, 2000, seed=0)]
    pq.write_table(pa.Table.from_pylist(train), root / "train.parquet")
    test = [
        {"id": f"gsm-{i}", "question": q, "answer": a}
        for i, (q, a) in enumerate(problems(16, 2000, seed=1))
    ]
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(test).save_to_disk(str(root / "gsm8k-test"))
    with open(root / "hard.jsonl", "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(problems(8, 200_000, seed=2)):
            row = {"id": f"hard-{i}", "messages": conversation(q), "answer": a.split("\n")[-1]}
            f.write(json.dumps(row) + "\n")
    (root / "my.yaml").write_text(CONFIG)
    return root / "my.yaml"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/chat_gsm8k.py DIR")
    print(write_example(Path(sys.argv[1])))
