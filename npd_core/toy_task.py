"""PLACEHOLDER (the toy-task helper replaces this file): sort 5-8 two-digit numbers."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARS = list("0123456789") + list(",=")
SPECIALS = ["<pad>", "<bos>", "<eos>"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<pad>")


def make_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        xs = [rng.randint(10, 99) for _ in range(rng.randint(5, 8))]
        out.append({"id": f"s{seed}-{i}", "prompt": ",".join(map(str, xs)) + "=",
                    "answer": ",".join(map(str, sorted(xs)))})
    return out
