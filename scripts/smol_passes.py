"""How many passes does the smol world's student need to learn a fact, and does it carry over?
SFT of the warm start on the teacher's greedy answers to first-letter questions about words no
prompt of the world uses, for 1, 2, 4 and 8 passes (each from the warm start, at the world's
distillation lr); then greedy points on those questions, on the same words asked in other
words, and on as many words it was not taught.

    .venv-smol/bin/python scripts/smol_passes.py --out npd-out/smol-deeper --json > passes.json

A probe for choosing the smol world's next spec, not part of the pipeline.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time

import torch
from smol_probe import current_world, parser

from npd_core.data import Prompt
from npd_core.method.evaluate import greedy_responses
from npd_core.models import format_prompts, load_model
from npd_core.toy import smol
from npd_core.toy.world import fit, fit_plan

PASSES = (1, 2, 4, 8)
OTHER_WORDS = 'Which letter does the word "{w}" start with?'


def _asked(words: list[str], template: str, tag: str) -> list[Prompt]:
    return [
        Prompt(f"first_letter-{tag}-{i}", template.format(w=w), w[0].upper())
        for i, w in enumerate(words)
    ]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=128, help="words taught (and as many not)")
    a = ap.parse_args()
    t0 = time.time()
    spec = smol.SmolSpec()
    world, tok = current_world(a.out)
    words = smol._words(tok)
    used = {p.prompt for s in smol.make_prompts(spec, words) for p in s}
    fresh = [w for w in words if smol.first_letter([w])[0][0] not in used]
    drawn = random.Random(0).sample(fresh, 2 * a.n)
    taught, untaught = drawn[: a.n], drawn[a.n :]
    template = smol.first_letter(["{w}"])[0][0]  # the world's own question
    sets = {
        "taught": _asked(taught, template, "t"),
        "taught_other_words": _asked(taught, OTHER_WORDS, "o"),
        "not_taught": _asked(untaught, template, "n"),
    }
    teacher = load_model(world.teacher).eval()
    ids = format_prompts(tok, [p.prompt for p in sets["taught"]], "auto")
    answers = greedy_responses(
        teacher, tok, ids, max_new_tokens=spec.max_new_tokens, batch_size=64, bf16=False
    )
    texts = [tok.decode(x, skip_special_tokens=True) for x in answers]
    sft = [
        Prompt(p.id, tok.decode(i), t) for p, i, t in zip(sets["taught"], ids, texts, strict=True)
    ]
    report: dict = {
        "world": world.root.name,
        "words": a.n,
        "lr": spec.warm_lr / 3,
        "teacher": {k: round(smol.score(teacher, tok, v, spec)[0], 1) for k, v in sets.items()},
    }
    del teacher
    warm = load_model(world.student).eval()
    rows = len(fit_plan(tok, sft, smol.Warmup(1, 1e-4), spec)[3])
    per_pass = math.ceil(rows / spec.rows_per_step)
    report["steps_a_pass"] = per_pass
    report["runs"] = [
        {"passes": 0, **{k: round(smol.score(warm, tok, v, spec)[0], 1) for k, v in sets.items()}}
    ]
    for passes in PASSES:
        student = copy.deepcopy(warm)
        torch.manual_seed(spec.seed)
        fit(student, tok, sft, smol.Warmup(passes * per_pass, spec.warm_lr / 3), spec)
        student.eval()
        row = {
            "passes": passes,
            **{k: round(smol.score(student, tok, v, spec)[0], 1) for k, v in sets.items()},
        }
        report["runs"].append(row)
        print(row, file=sys.stderr, flush=True)
    report["probe_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=1) if a.json else report)


if __name__ == "__main__":
    main()
