"""Candidate number tasks for the smol world, or second phrasings of its tasks (``--group
phrasings``): the teacher's and the current student's greedy points on each (through the chat
template, graded by the world's ``ANSWER_REGEX``).

Number questions ask the student to restate a number, not a word, before its answer ("592 + 1 =
593"), so a cut before the answer leaves the teacher a prefix it can finish (the successor
task's M3 drop is about 1 point), and each is a rule rather than one fact per prompt, so what a
round teaches can carry over to held-out prompts.

    .venv-smol/bin/python scripts/smol_tasks.py --out npd-out/smol-deeper --json > smol-tasks.json

A second phrasing asks about a task's item (a word, a number, a sum) in other words than the
world's question, for held-out questions about the distillation prompts' own items.

A probe for choosing the smol world's next spec, not part of the pipeline.
"""

from __future__ import annotations

import json
import random
import sys
import time

from smol_probe import current_world, parser

from npd_core.data import Prompt
from npd_core.models import load_model
from npd_core.toy import smol

ONLY = smol.ONLY_NUMBER
NUMBERS = range(10, 999)
# task → (question, answer) of a number n (a second number m drawn where the task has one)
CANDIDATES = {
    "successor": lambda n, m: (f"What is {n} + 1?{ONLY}", n + 1),
    "predecessor": lambda n, m: (f"What is {n} - 1?{ONLY}", n - 1),
    "plus_two": lambda n, m: (f"What is {n} + 2?{ONLY}", n + 2),
    "plus_ten": lambda n, m: (f"What is {n} + 10?{ONLY}", n + 10),
    "minus_ten": lambda n, m: (f"What is {n} - 10?{ONLY}", n - 10),
    "plus_zero": lambda n, m: (f"What is {n} + 0?{ONLY}", n),
    "times_ten": lambda n, m: (f"What is {n} * 10?{ONLY}", n * 10),
    "larger": lambda n, m: (f"Which is larger, {n} or {m}?{ONLY}", max(n, m)),
}
# name → (task, question and answer of the task's item)
PHRASINGS = {
    "first_letter_initial": (
        "first_letter",
        lambda w: f'What is the initial letter of the word "{w}"?',
    ),
    "first_letter_tell": ("first_letter", lambda w: f'Tell me the first letter of the word "{w}".'),
    "first_letter_start": (
        "first_letter",
        lambda w: f'What letter does the word "{w}" start with?',
    ),
    "successor_plus": ("successor", lambda n: f"What is {n} plus 1?{ONLY}"),
    "successor_swapped": ("successor", lambda n: f"What is 1 + {n}?{ONLY}"),
    "successor_more": ("successor", lambda n: f"What number is one more than {n}?{ONLY}"),
    "addition_plus": ("addition", lambda ab: f"What is {ab[0]} plus {ab[1]}?{ONLY}"),
    "addition_sum": ("addition", lambda ab: f"What is the sum of {ab[0]} and {ab[1]}?{ONLY}"),
    "addition_swapped": ("addition", lambda ab: f"What is {ab[1]} + {ab[0]}?{ONLY}"),
}
ANSWER = {"first_letter": lambda w: w[0].upper(), "successor": lambda n: n + 1, "addition": sum}


def _phrasing_prompts(n: int, words: list[str], rng: random.Random) -> dict[str, list[Prompt]]:
    """Each phrasing on n items of its task (every one-digit sum, there being 100)."""
    items = {
        "first_letter": rng.sample(words, n),
        "successor": rng.sample(NUMBERS, n),
        "addition": [(a, b) for a in range(10) for b in range(10)],
    }
    return {
        name: [
            Prompt(f"{task}-{i}", ask(x), str(ANSWER[task](x))) for i, x in enumerate(items[task])
        ]
        for name, (task, ask) in PHRASINGS.items()
    }


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=200, help="prompts a task")
    ap.add_argument("--group", choices=("numbers", "phrasings"), default="numbers")
    a = ap.parse_args()
    t0 = time.time()
    world, tok = current_world(a.out)
    spec = smol.SmolSpec()
    rng = random.Random(0)
    if a.group == "phrasings":
        prompts = _phrasing_prompts(a.n, smol._words(tok), rng)
    else:
        prompts = {
            name: [
                Prompt(f"{name}-{i}", *map(str, make(n, rng.choice(NUMBERS))))
                for i, n in enumerate(rng.sample(NUMBERS, a.n))
            ]
            for name, make in CANDIDATES.items()
        }
    report: dict = {"world": world.root.name, "group": a.group, "prompts_a_task": a.n, "tasks": {}}
    for role, path in (("teacher", world.teacher), ("student", world.student)):
        model = load_model(path).eval()
        for name, ps in prompts.items():
            points, texts = smol.score(model, tok, ps, spec)
            task = report["tasks"].setdefault(name, {"example": ps[0].prompt})
            task[role] = round(points, 1)
            task[f"{role}_says"] = texts[0]
            print(f"{role:8} {name:12} {points:5.1f}  {texts[0]!r}", file=sys.stderr)
        del model
    report["probe_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=1) if a.json else report)


if __name__ == "__main__":
    main()
