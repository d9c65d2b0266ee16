"""The toy task: sort 5-8 two-letter words (duplicates kept) alphabetically; exact match on the
whole list.

The words are ``aa``…``ej`` (50 of them, ordered like the two-digit numbers 10-59) and each is
one token, so the task is "sort numbers" with one token per number. Why this task: the answer is
many tokens long and each pick depends on the ones before it, so an early mistake derails the
rest (as in the reasoning tasks NPD targets); the checker is exact; the 4-layer teacher reaches
>= 90% within the CPU budget here; and it has a capacity gap a small student cannot close: a
one-layer student must choose each next word in a single attention step (no room to count
duplicates or to compose), and plateaus in the 70s on the true answers while the teacher reaches
the 90s. With one token per character the same sort had no gap (a two-layer 84 k student reached
99.6%), and computed-key sorts, prefix sums, pointer chasing, random walks on an 800-entry table
and 3-digit sorts left the teacher far below 90% within the budget (see docs/worlds.md). Fixed
before any method was compared.

Why letters and not digits: the checkpoints are Qwen2, and ``AutoTokenizer`` loads every Qwen2
checkpoint with Qwen2's own pre-tokenizer, which splits digits one by one. The tokenizer below is
a byte-level BPE with exactly that pre-tokenizer, so ours, ``AutoTokenizer`` and vLLM all
tokenize the same way; its merges make each `` <word>`` one token.
Prompt ``"sort dc ab ej ab ="`` -> answer ``"ab ab dc ej"`` (the model writes ``" ab ab dc ej"``
then EOS: byte-level words carry their leading space).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

MIN_LEN, MAX_LEN = 5, 8  # how many words a prompt holds
WORDS = [a + b for a in "abcde" for b in "abcdefghij"]  # 50 words, alphabetical = numeric order
SPECIALS = ["<pad>", "<bos>", "<eos>"]
MAX_NEW_TOKENS = MAX_LEN + 2  # longest answer plus EOS, with a token to spare
# Qwen2's pre-tokenizer split (what AutoTokenizer applies to any Qwen2 checkpoint)
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: the 256 byte symbols (any text encodes), plus one merged token per
    `` <word>``, `` =`` and ``sort``; 318 tokens with the specials. No BOS/EOS added."""
    merges = [("Ġ", c) for c in "abcde"] + [("Ġ" + w[0], w[1]) for w in WORDS]
    merges += [("Ġ", "="), ("s", "o"), ("so", "r"), ("sor", "t")]
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<pad>",
    )


def response_text(answer: str) -> str:
    """The answer as the model writes it after the prompt (words carry their leading space)."""
    return " " + answer


def solve(prompt: str) -> str:
    """The true answer of a prompt (the checker's reference)."""
    return " ".join(sorted(prompt.removeprefix("sort").rstrip("=").split()))


def make_examples(
    n: int,
    seed: int,
    min_len: int = MIN_LEN,
    max_len: int = MAX_LEN,
    solve: Callable[[str], str] = solve,
    id_prefix: str = "s",
) -> list[dict]:
    """``n`` examples with distinct prompts of ``min_len``–``max_len`` words (uniform), so any
    slicing into splits is disjoint; ids ``<id_prefix><seed>-<i>``. Every world draws its
    prompts here (the answer is its own ``solve``), so the same seed and lengths give the
    same prompts in every world."""
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < n:
        xs = [rng.choice(WORDS) for _ in range(rng.randint(min_len, max_len))]
        prompt = "sort " + " ".join(xs) + " ="
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(
            {"id": f"{id_prefix}{seed}-{len(out)}", "prompt": prompt, "answer": solve(prompt)}
        )
    return out
