"""The toy task: sort 5-8 two-digit numbers (duplicates kept); exact match on the whole list.

Why this task: the answer is many tokens long and each pick depends on the ones before it, so
an early mistake derails the rest (as in the reasoning tasks NPD targets); the checker is exact;
and it is the one candidate whose 4-layer teacher reaches >= 90% within the CPU budget here
(computed-key sorts, prefix sums mod 100, pointer chasing and 3-digit sorts did not; see the
README). Fixed before any method was compared.
Prompt ``"63,15,43,75,72,61,48,71="`` -> answer ``"15,43,48,61,63,71,72,75"`` (then EOS).
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

MIN_LEN, MAX_LEN = 5, 8  # how many numbers a prompt holds
LOW, HIGH = 10, 99  # two-digit numbers, so every number is exactly two tokens
CHARS = list("0123456789") + list(",=")
SPECIALS = ["<pad>", "<bos>", "<eos>"]
MAX_NEW_TOKENS = 3 * MAX_LEN + 2  # longest answer (23 chars) plus EOS, with a token to spare


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (15 tokens with specials); no BOS/EOS added by encoding."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<pad>",
    )


def solve(prompt: str) -> str:
    """The true answer of a prompt (the checker's reference)."""
    xs = [int(x) for x in prompt.rstrip("=").split(",")]
    return ",".join(map(str, sorted(xs)))


def make_examples(n: int, seed: int) -> list[dict]:
    """``n`` examples with distinct prompts, so any slicing into splits is disjoint."""
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < n:
        xs = [rng.randint(LOW, HIGH) for _ in range(rng.randint(MIN_LEN, MAX_LEN))]
        prompt = ",".join(map(str, xs)) + "="
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"id": f"s{seed}-{len(out)}", "prompt": prompt, "answer": solve(prompt)})
    return out
