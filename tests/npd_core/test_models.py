"""Frozen models in the precision they run in (resident memory of a ~200 M-parameter load), and
prompts formatted for a model: the exact text through its chat template, and its ids."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from chat_models import chat_tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM

from npd_core.errors import DataError
from npd_core.models import format_prompts, frozen_dtype, prompt_texts

# Loads one checkpoint with the given dtype in a fresh interpreter, reads every weight once (a
# bf16 load maps the safetensors file, whose pages are resident only once read) and prints how
# much its resident memory grew (torch and transformers imported first, so only weights count).
MEASURE = """
import json, sys, torch
from npd_core.models import load_model
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
model = load_model(sys.argv[1], getattr(torch, sys.argv[2]))
with torch.no_grad():
    for p in model.parameters():
        p.sum()
print(json.dumps({"grew": rss() - before, "dtype": str(next(model.parameters()).dtype)}))
"""


def _grew(path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), dtype],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_frozen_bfloat16_load_grows_resident_memory_by_about_its_bf16_size(tmp_path):
    """A random Qwen2 of ~200 M parameters saved in bfloat16 (as hub checkpoints are): loaded
    with ``frozen_dtype: bfloat16`` and every weight read, resident memory grows by 0.8-1.2 × its
    bf16 size (1.04 × measured); loaded in float32 (the learner's master weights, and ``auto``
    on CPU) by about twice that (2.04 × measured)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=14,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
    assert 180e6 < n < 220e6
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    bf16_bytes = 2 * n
    lean = _grew(tmp_path / "m", "bfloat16")
    full = _grew(tmp_path / "m", "float32")
    assert lean["dtype"] == "torch.bfloat16" and full["dtype"] == "torch.float32"
    assert 0.8 * bf16_bytes <= lean["grew"] <= 1.2 * bf16_bytes, lean["grew"] / bf16_bytes
    assert full["grew"] >= 1.8 * bf16_bytes, full["grew"] / bf16_bytes
    assert frozen_dtype("bfloat16") == torch.bfloat16 and frozen_dtype("float32") == torch.float32
    expected_auto = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert frozen_dtype("auto") == expected_auto


def test_large_weights_are_sharded_and_load_with_plain_from_pretrained(tmp_path, tiny_world):
    """Above ``max_shard_size`` a checkpoint is several safetensors shards and an index, and
    ``AutoModelForCausalLM.from_pretrained`` loads the same weights from it."""
    from transformers import AutoModelForCausalLM

    from npd_core.models import load_model, load_tokenizer, save_checkpoint

    model = load_model(tiny_world.student)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    save_checkpoint(model, load_tokenizer(tiny_world.student), tmp_path / "c", None, total // 3)
    shards = sorted(p.name for p in (tmp_path / "c").glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "c" / "model.safetensors.index.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_prompts_go_through_the_chat_template_with_their_system_turn():
    """A conversation is rendered with ``add_generation_prompt`` and its system turn; a string is
    one user turn; the ids are the rendered text's tokens, as ``apply_chat_template`` gives."""
    tok = chat_tokenizer()
    convo = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6 * 7?"},
    )
    texts = prompt_texts(tok, [convo, "Hi"], "auto")
    assert texts == [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 6 * 7?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ]
    ids = format_prompts(tok, [convo, "Hi"], "auto")
    want = tok.apply_chat_template(list(convo), add_generation_prompt=True)["input_ids"]
    assert ids[0] == want and ids[0][0] == tok.bos_token_id and ids[0].count(tok.eos_token_id) == 2
    assert tok.decode(ids[1]) == texts[1]


def test_raw_prompts_and_conversations_without_a_template():
    """``chat_template: none`` tokenises a string as it is (the tokenizer's own specials); a
    conversation then, or with a tokenizer that has no template, is one DataError."""
    tok = chat_tokenizer()
    assert prompt_texts(tok, ["Hi"], "none") == ["Hi"]
    assert format_prompts(tok, ["Hi"], "none") == [tok("Hi")["input_ids"]]
    convo = ({"role": "user", "content": "Hi"},)
    with pytest.raises(DataError, match="need the tokenizer's chat template and data.chat_"):
        format_prompts(tok, [convo], "none")
    with pytest.raises(DataError, match="chat template and it has none"):
        format_prompts(chat_tokenizer(template=None), [convo], "auto")
    strict = chat_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"chat template refused a prompt \(roles must alternate"):
        format_prompts(strict, [convo], "auto")
