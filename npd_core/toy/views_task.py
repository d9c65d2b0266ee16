"""The views task: eight views of a list of 5-8 two-letter words, one line each, graded per line.

The prompt is the toy's (``sort w1 … wn =``, the words ``aa``…``ej`` of ``npd_core.toy.task``,
one token each). The answer is eight lines, each a one-letter view marker and then one view of
the list (``VIEWS``)::

    sort dc ab ej ab =   →   A ab ab dc ej        ascending
                             D ej dc ab ab        descending
                             U ab dc ej           unique, ascending
                             W ej dc ab           unique, descending
                             R ab ej ab dc        the prompt reversed
                             S ab ab dc ej        by second letter, ties by the first
                             L ab ab dc           the 3 smallest, ascending
                             H ej dc ab           the 3 largest, descending

which the model writes as ``"A ab ab dc ej\\nD ej dc ab ab\\n…"`` then EOS: each marker and each
`` <word>`` is one token, as is a newline, so a list of ``n`` words with ``u`` distinct ones
answers in ``4n + 2u + 22`` tokens with its EOS (``answer_tokens``; 70 at most). Why this task:
the answer is long (≈ 60 tokens, so student decoding dominates an on-policy step, as at model
scale) but each line depends only on the prompt and its marker, so an error stays in its line
and a teacher can continue correctly after a wrong line (the long world's trace copied each line
from the one before, and one error spoiled every later line). Graded per line (``eval.metric:
lines``: the fraction of the eight reference lines matched in place), with whole-answer exact
match beside it. Fixed, with its gate checks (``npd_core.toy.gates``), before any method was
compared on it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from npd_core.toy import task
from npd_core.toy.task import build_tokenizer

__all__ = [
    "VIEWS",
    "answer_tokens",
    "build_tokenizer",
    "make_examples",
    "misread",
    "off_path",
    "response_text",
    "solve",
]

TOP = 3  # words of the smallest/largest views


def _unique(words: list[str]) -> list[str]:
    return sorted(set(words))


# marker → its view of the prompt's words, in answer order
VIEWS: dict[str, Callable[[list[str]], list[str]]] = {
    "A": sorted,
    "D": lambda ws: sorted(ws, reverse=True),
    "U": _unique,
    "W": lambda ws: _unique(ws)[::-1],
    "R": lambda ws: ws[::-1],
    "S": lambda ws: sorted(ws, key=lambda w: (w[1], w[0])),
    "L": lambda ws: sorted(ws)[:TOP],
    "H": lambda ws: sorted(ws, reverse=True)[:TOP],
}


def prompt_words(prompt: str) -> list[str]:
    return prompt.removeprefix("sort").rstrip("=").split()


def solve(prompt: str) -> str:
    """The true answer of a prompt: one line per view, ``<marker> <words>``."""
    words = prompt_words(prompt)
    return "\n".join(" ".join([m, *view(words)]) for m, view in VIEWS.items())


def response_text(answer: str) -> str:
    """The answer as the model writes it after the prompt: the lines as they are (the marker
    opens each line; every word carries its leading space)."""
    return answer


def answer_tokens(prompt: str) -> int:
    """Response tokens of the true answer, EOS included: four lines of ``n`` words, two of the
    ``u`` distinct ones and two of ``TOP``, eight markers, seven newlines and the EOS."""
    words = prompt_words(prompt)
    return 4 * len(words) + 2 * len(set(words)) + 2 * TOP + len(VIEWS) + len(VIEWS) - 1 + 1


def make_examples(n: int, seed: int, min_len: int, max_len: int) -> list[dict]:
    """``n`` examples with distinct prompts of ``min_len``–``max_len`` words (uniform)."""
    return task.make_examples(n, seed, min_len, max_len, solve, id_prefix="v")


# A student's wrong lines, as gate M3 found them in the 24×2 student's temperature-1 samples
# (1,209 wrong lines of 256): 54% the right length with other words, 42% a wrong length, 5% a
# wrong marker, one a pure reordering; 59% of its lines were wrong. Each kind of edit a wrong
# off-path line gets, by weight (a word dropped or inserted moves the length):
EDITS = {"replace": 11, "insert": 4, "drop": 4, "marker": 1}
WRONG_LINE = 0.6  # the chance each line before a cut is wrong


def _edit(marker: str, words: list[str], kind: str, rng: random.Random) -> str:
    """One edit in place (``words``); returns the marker, changed by a ``marker`` edit."""
    if kind == "drop" and len(words) > 1:
        del words[rng.randrange(len(words))]
    elif kind == "insert":
        words.insert(rng.randrange(len(words) + 1), rng.choice(task.WORDS))
    elif kind == "marker":
        marker = rng.choice([m for m in VIEWS if m != marker])
    else:
        k = rng.randrange(len(words))
        words[k] = rng.choice([w for w in task.WORDS if w != words[k]])
    return marker


def _wrong(line: str, rng: random.Random, edits: int) -> str:
    """The line with 1–``edits`` mistakes of a student's kinds (``EDITS``): words replaced by
    other task words (mostly words not in the prompt), inserted or dropped, or the marker
    changed; never the line itself."""
    kinds, weights = zip(*EDITS.items(), strict=True)
    while True:
        marker, *words = line.split(" ")
        for kind in rng.choices(kinds, weights, k=rng.randint(1, edits)):
            marker = _edit(marker, words, kind, rng)
        out = " ".join([marker, *words])
        if out != line:
            return out


def misread(prompt: str, rng: random.Random) -> list[str]:
    """The answer's lines for the prompt's words read once wrongly: one word dropped, inserted
    or replaced (``_edit``), so every view carries the same mistake, as a student that misread
    the list writes them."""
    words = prompt_words(prompt)
    while True:
        got = list(words)
        _edit("", got, rng.choice(("replace", "insert", "drop")), rng)
        if got != words:
            return solve("sort " + " ".join(got) + " =").split("\n")


def off_path(
    prompt: str, answer: str, rng: random.Random, edits: int, misread_share: float
) -> tuple[str, str]:
    """A teacher's example off the path a student writes: the answer cut after its first j
    lines (j uniform in 1–7), each of those wrong with probability ``WRONG_LINE``: with
    probability ``misread_share`` the example's wrong lines are views of one misreading of the
    list (``misread``: a student's errors repeat from line to line), else each has 1–``edits``
    edits of its own (``_wrong``). Returns the prefix (with its newline), read as context, and
    the true rest, the target. A teacher trained on these writes each line from the prompt
    whatever came before it, as gate M3 asks of it."""
    lines = answer.split("\n")
    j = rng.randint(1, len(lines) - 1)
    misread_lines = misread(prompt, rng) if rng.random() < misread_share else None
    prefix = []
    for i, x in enumerate(lines[:j]):
        if rng.random() < WRONG_LINE:
            x = (
                misread_lines[i]
                if misread_lines and misread_lines[i] != x
                else _wrong(x, rng, edits)
            )
        prefix.append(x)
    return "\n".join(prefix) + "\n", "\n".join(lines[j:])
