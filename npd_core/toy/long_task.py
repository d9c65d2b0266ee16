"""The long-answer task: selection sort of two-letter words written out pass by pass, one line
per pass; graded by exact match of the final line (the sorted list).

The words and the tokenizer are the toy task's (``npd_core.toy.task``: 50 words ``aa``…``ej``,
one token each; a newline is one byte-level token too), so a line of ``n`` words is ``n + 1``
tokens. Pass ``i`` (``i = 0 … n−2``) swaps position ``i`` with the first position of the
smallest word among positions ``i … n−1``, and its line is the whole list after the swap, so the
response has ``n − 1`` lines and ``n² − 1`` tokens with its EOS: every token is either a copy of
the previous line or the one swapped word, and the final line is the sorted list.

Prompt ``"sort dc ab ej ab ="`` -> answer (the trace)::

    ab dc ej ab
    ab ab ej dc
    ab ab dc ej

which the model writes as ``" ab dc ej ab\\n ab ab ej dc\\n ab ab dc ej"`` then EOS (each word
carries its leading space, as in the toy). Why this task: the response is long (its length
grows as the square of the list, a long tail) and written step by step like a reasoning trace,
so generation dominates an on-policy step as it does at model scale; each pass depends on the
one before, so an early mistake derails the final line; and the checker is exact. Fixed before
any method was compared on it (the search that chose its sizes: npd-out/world-search/REPORT.md
and docs/worlds.md).
"""

from __future__ import annotations

from npd_core.toy import task
from npd_core.toy.task import build_tokenizer

__all__ = [
    "build_tokenizer",
    "final_line",
    "make_examples",
    "passes",
    "response_text",
    "solve",
    "trace_tokens",
]


def passes(words: list[str]) -> list[list[str]]:
    """The list after each selection-sort pass (``len(words) − 1`` of them; ties: first min)."""
    xs = list(words)
    out = []
    for i in range(len(xs) - 1):
        j = min(range(i, len(xs)), key=lambda k: (xs[k], k))
        xs[i], xs[j] = xs[j], xs[i]
        out.append(list(xs))
    return out


def prompt_words(prompt: str) -> list[str]:
    return prompt.removeprefix("sort").rstrip("=").split()


def solve(prompt: str) -> str:
    """The true answer of a prompt: its trace, one pass a line (words space-separated)."""
    return "\n".join(" ".join(line) for line in passes(prompt_words(prompt)))


def response_text(answer: str) -> str:
    """The trace as the model writes it after the prompt: every word with its leading space."""
    return "\n".join(" " + line for line in answer.split("\n"))


def final_line(text: str) -> str:
    """The last non-empty line, whitespace-normalized (what the grader compares)."""
    lines = [x for x in text.split("\n") if x.strip()]
    return " ".join(lines[-1].split()) if lines else ""


def trace_tokens(n: int) -> int:
    """Response tokens of a list of ``n`` words, EOS included: ``n − 1`` lines of ``n`` words,
    ``n − 2`` newlines and the EOS."""
    return n * n - 1


def make_examples(n: int, seed: int, min_len: int, max_len: int) -> list[dict]:
    """``n`` examples with distinct prompts of ``min_len``–``max_len`` words (uniform)."""
    return task.make_examples(n, seed, min_len, max_len, solve, id_prefix="l")
