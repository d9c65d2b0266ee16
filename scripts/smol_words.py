"""The smol world's M3 on first-letter questions, by how common the word is: the student restates
the asked word before its answer ("The first letter of the word "debtor" is ...") and, when it
restates another word, the teacher answers for that one. Words are ranked by their token's id
(byte-pair merges come in order of frequency, so a low id is a common word); for each band of
ranks, θ₀'s temperature-1 samples, the share that restate the asked word, and M3 (the teacher
from the prompt against the teacher continuing θ₀'s sample cut before its answer).

    .venv-smol/bin/python scripts/smol_words.py --out npd-out/smol --json > smol-words.json

A probe for choosing the smol world's next spec, not part of the pipeline.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time

from smol_probe import current_world, parser

from npd_core.data import Prompt
from npd_core.method.answers import metric_fn
from npd_core.models import format_prompts, load_model
from npd_core.toy import smol
from npd_core.toy.gates import answer_cut, continue_greedily, sample
from npd_core.toy.world import world_spec

BANDS = (0, 1000, 2000, 4000, 8000, 16000)  # word ranks: [0, 1000), [1000, 2000), … , [16000, …)
RESTATED = re.compile(r'word\s+"([^"]*)"')


def _acc(score, texts: list[str], prompts: list[Prompt]) -> float:
    return round(
        100 * statistics.mean(score(t, p.answer) for t, p in zip(texts, prompts, strict=True)), 1
    )


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--per-band", type=int, default=128, help="words drawn from each band")
    a = ap.parse_args()
    t0 = time.time()
    world, tok = current_world(a.out)
    words = smol._words(tok)
    rng = random.Random(0)
    score = metric_fn("regex", smol.ANSWER_REGEX)
    teacher, student = load_model(world.teacher), load_model(world.student)
    report = {"words": len(words), "bands": []}
    for lo, hi in zip(BANDS, (*BANDS[1:], len(words)), strict=True):
        drawn = rng.sample(words[lo:hi], min(a.per_band, hi - lo))
        prompts = [
            Prompt(w, q, ans) for w, (q, ans) in zip(drawn, smol.first_letter(drawn), strict=True)
        ]
        ids = format_prompts(tok, [p.prompt for p in prompts], "auto")
        cap = world_spec("smol").max_new_tokens
        gens = sample(student, tok, ids, cap, seed=0)
        texts = [tok.decode(g.token_ids, skip_special_tokens=True) for g in gens]
        restated = [RESTATED.search(t) for t in texts]
        same = [
            m is not None and m.group(1).strip().lower() == w
            for m, w in zip(restated, drawn, strict=True)
        ]
        own = continue_greedily(teacher, tok, ids, [[] for _ in ids], cap, batch_size=64)
        cut_rng = random.Random(0)
        prefixes = [g.token_ids[: answer_cut(tok, g.token_ids, cut_rng)] for g in gens]
        cont = continue_greedily(teacher, tok, ids, prefixes, cap, batch_size=64)
        band = {
            "ranks": [lo, hi],
            "n": len(prompts),
            "student_restates_the_word": round(100 * statistics.mean(same), 1),
            "student_restates_another": round(
                100
                * sum(m is not None and not s for m, s in zip(restated, same, strict=True))
                / len(prompts),
                1,
            ),
            "student_t1": _acc(score, texts, prompts),
            "teacher_from_prompt": _acc(score, own, prompts),
            "teacher_off_path": _acc(score, cont, prompts),
        }
        band["drop"] = round(band["teacher_from_prompt"] - band["teacher_off_path"], 1)
        band["examples"] = [[w, t] for w, t, s in zip(drawn, texts, same, strict=True) if not s][:3]
        report["bands"].append(band)
        print(
            json.dumps({k: v for k, v in band.items() if k != "examples"}),
            file=sys.stderr,
            flush=True,
        )
    report["probe_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=1) if a.json else report)


if __name__ == "__main__":
    main()
