"""How much a views student loses to its own earlier lines: its greedy per-line accuracy on the
lines after a cut in the *true* answer (the true lines in its context) against its own answer
from the prompt on the same lines, and its accuracy per view. A gap is what on-policy training
could win back, if the student had the capacity to learn it. Prints one JSON line::

    python scripts/views_exposure.py WORLD_DIR STUDENT_DIR
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from npd_core.config import NPDConfig
from npd_core.data import read_prompts
from npd_core.models import format_prompts, load_model, load_tokenizer
from npd_core.toy.gates import continue_greedily, grade, greedy_texts, off_path
from npd_core.toy.world import ViewsSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", help="a built views world (its tokenizer and held-out prompts)")
    ap.add_argument("student", help="the student checkpoint to measure")
    ap.add_argument("--held-out", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = NPDConfig.model_validate(ViewsSpec().config_defaults())
    tok = load_tokenizer(f"{a.world}/teacher")
    model = load_model(a.student).eval()
    held = read_prompts(f"{a.world}/eval.jsonl")[: a.held_out]
    ids = format_prompts(tok, [p.prompt for p in held], cfg.data.chat_template)
    cap = cfg.generate.max_new_tokens
    answers = [p.answer for p in held]
    own = grade(greedy_texts(model, tok, ids, cap), answers).line_hits
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    rng = random.Random(0)
    kept, prefixes = [], []
    for answer in answers:
        true = tok(answer)["input_ids"]
        ends = [i + 1 for i, t in enumerate(true) if t == newline]
        k = rng.randint(1, len(ends))  # 1 to 7 true lines in the context
        kept.append(k)
        prefixes.append(true[: ends[k - 1]])
    joined = continue_greedily(model, tok, ids, prefixes, cap)
    after = off_path(own, grade(joined, answers).line_hits, kept)
    markers = [line.split(" ")[0] for line in answers[0].split("\n")]
    per_view = {m: round(100 * sum(h[j] for h in own) / len(own), 1) for j, m in enumerate(markers)}
    row = {
        "held_out": len(held),
        "remaining_lines": after["remaining_lines"],
        "own_prefix": after["teacher_from_prompt"],
        "true_prefix": after["teacher_off_path"],
        "gap": round(-after["drop"], 2),
        "per_view": per_view,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
