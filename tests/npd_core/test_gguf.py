"""GGUF teachers and students: a tiny Llama written as a GGUF file here (as llama.cpp's converter
writes one: q/k rows permuted, the byte-level vocabulary as a gpt2 tokenizer) converts once into
a plain HF checkpoint whose logits equal transformers' own GGUF load; a run's model path that
names the file resolves to that checkpoint, cached by the file's digest."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from chat_models import chat_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from flows.cli import app
from npd_core import modelio
from npd_core.errors import ModelError
from npd_core.modelio import SMOL_INSTALL, local_model

needs_extra = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in modelio.SMOL_EXTRA),
    reason=f"needs the smol extra (gguf, accelerate): {SMOL_INSTALL}",
)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k projections (convert_hf_to_gguf's LlamaModel.permute)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_tiny_gguf(path, tied: bool = True) -> LlamaForCausalLM:
    """A random 2-layer Llama (GQA) with the chat tokenizer's vocabulary, written to ``path``
    as a float32 GGUF file; returns the HF model it was written from."""
    import gguf

    tok = chat_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab]
    )
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_merges([])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_chat_template(tok.chat_template)
    names = {
        "self_attn.o_proj": "attn_output",
        "self_attn.v_proj": "attn_v",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    tensors = {"token_embd.weight": model.model.embed_tokens.weight}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        tensors[f"blk.{i}.attn_q.weight"] = _permute(attn.q_proj.weight, cfg.num_attention_heads)
        tensors[f"blk.{i}.attn_k.weight"] = _permute(attn.k_proj.weight, cfg.num_key_value_heads)
        for hf, name in names.items():
            tensors[f"blk.{i}.{name}.weight"] = layer.get_submodule(hf).weight
    tensors["output_norm.weight"] = model.model.norm.weight
    if not tied:
        tensors["output.weight"] = model.lm_head.weight
    for name, t in tensors.items():
        w.add_tensor(name, t.detach().float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_missing_extra_is_one_line_naming_the_install(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(modelio, "SMOL_EXTRA", ("npd_no_such_module",))
    with pytest.raises(ModelError, match=r"needs the smol extra .*make smol") as e:
        local_model(str(tmp_path / "m.gguf"), tmp_path / "cache")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="no such GGUF file"):
        local_model(str(tmp_path / "absent.gguf"), tmp_path / "cache")
    assert local_model(str(tmp_path), tmp_path / "cache") == str(tmp_path)  # a folder as is


@pytest.mark.smol
@needs_extra
@pytest.mark.parametrize("tied", [True, False])
def test_gguf_converts_once_to_a_plain_checkpoint_with_transformers_logits(tmp_path, tied):
    """Logits of the converted checkpoint equal transformers' own GGUF load (max difference
    0.0) and, for a float32 file, the model it was written from (≤ 1e-5); the tokenizer encodes
    as the source's; the config has no quantization_config; the same file converts once."""
    source = write_tiny_gguf(tmp_path / "tiny.gguf", tied)
    path = local_model(str(tmp_path / "tiny.gguf"), tmp_path / "models")
    assert path.startswith(str(tmp_path / "models" / "gguf-"))
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not hasattr(plain.config, "quantization_config")
    assert plain.config.tie_word_embeddings is tied
    native = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    ids = torch.randint(0, source.config.vocab_size, (2, 10))
    with torch.no_grad():
        got = plain(ids).logits
        assert torch.equal(got, native(ids).logits)
        torch.testing.assert_close(got, source(ids).logits, rtol=0, atol=1e-5)
    text = "<|start_header_id|>user: 7 + 8 = ?"
    assert (
        AutoTokenizer.from_pretrained(path)(text)["input_ids"]
        == chat_tokenizer()(text)["input_ids"]
    )
    stamp = (tmp_path / path / "config.json").stat().st_mtime_ns
    assert local_model(str(tmp_path / "tiny.gguf"), tmp_path / "models") == path
    assert (tmp_path / path / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.smol
@needs_extra
def test_npd_models_import_writes_the_checkpoint(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    res = CliRunner().invoke(
        app, ["models", "import", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")]
    )
    assert res.exit_code == 0, res.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 2
