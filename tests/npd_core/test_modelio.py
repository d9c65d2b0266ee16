"""Depth-pruned students (``npd models prune``): the kept layers, renumbered, compute exactly what
they computed in the teacher; the config and its per-layer lists follow; plain
``from_pretrained`` loads the result."""

from __future__ import annotations

import pytest
import torch
from chat_models import chat_tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from typer.testing import CliRunner

from flows.cli import app
from npd_core.errors import ConfigError, ModelError
from npd_core.modelio import picked_layers, prune

LAYER_TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _teacher(path, family: str, tied: bool):
    """A random 4-layer Qwen2 (with per-layer attention types) or Llama (GQA), saved with the
    byte-level chat tokenizer."""
    tok = chat_tokenizer()
    shape = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    if family == "qwen2":
        cfg = Qwen2Config(
            use_sliding_window=True, sliding_window=8, layer_types=LAYER_TYPES, **shape
        )
        model = Qwen2ForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize(("family", "tied"), [("qwen2", True), ("llama", False)])
def test_first_k_layers_compute_what_they_computed_in_the_teacher(tmp_path, family, tied):
    """Pruned to its first 2 of 4 layers: the student's hidden states 0..2 equal the teacher's
    (max difference 0.0), and its logits are the teacher's head on the teacher's layer-2 output
    through the final norm; embeddings tied exactly when the teacher's are."""
    teacher = _teacher(tmp_path / "t", family, tied)
    prune(tmp_path / "t", tmp_path / "s", layers=2)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()  # nothing of ours
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    if family == "qwen2":
        assert student.config.layer_types == LAYER_TYPES[:2]
    assert student.config.tie_word_embeddings is tied
    same = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert same is tied
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=True)
        s = student(ids, output_hidden_states=True)
        expected = teacher.lm_head(teacher.model.norm(t.hidden_states[2]))
    for k in range(2):
        assert torch.equal(s.hidden_states[k], t.hidden_states[k]), k
    torch.testing.assert_close(s.logits, expected, rtol=0, atol=1e-5)


def test_stride_and_last_k_keep_those_layers_with_their_config_entries(tmp_path):
    """``stride`` keeps every n/K-th layer from 0 (SmolLM2's 30 → 8: 0, 3, 7, …, 26), ``last-k``
    the last K; each kept layer's weights and attention type are the teacher's."""
    assert picked_layers(30, 8, "first") == list(range(8))
    assert picked_layers(30, 8, "stride") == [0, 3, 7, 11, 15, 18, 22, 26]
    assert picked_layers(30, 8, "last-k") == list(range(22, 30))
    teacher = _teacher(tmp_path / "t", "qwen2", True)
    for pick, keep in (("stride", [0, 2]), ("last-k", [2, 3])):
        prune(tmp_path / "t", tmp_path / pick, layers=2, pick=pick)
        student = AutoModelForCausalLM.from_pretrained(tmp_path / pick)
        assert student.config.layer_types == [LAYER_TYPES[i] for i in keep]
        for new, old in enumerate(keep):
            a = student.model.layers[new].mlp.up_proj.weight
            assert torch.equal(a, teacher.model.layers[old].mlp.up_proj.weight), (pick, new)


def test_bad_layer_counts_and_picks_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--layers 5: the model has 4 decoder layers; choose 1"):
        picked_layers(4, 5)
    with pytest.raises(ConfigError, match=r"--pick every: unknown; choose from first, stride"):
        picked_layers(4, 2, "every")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="convert the GGUF file first with `npd models import"):
        prune(tmp_path / "m.gguf", tmp_path / "s", layers=2)


def test_npd_models_prune_writes_a_student(tmp_path):
    _teacher(tmp_path / "t", "llama", True)
    res = CliRunner().invoke(
        app, ["models", "prune", str(tmp_path / "t"), str(tmp_path / "s"), "--layers", "3"]
    )
    assert res.exit_code == 0, res.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_hidden_layers == 3
    res = CliRunner().invoke(
        app, ["models", "prune", str(tmp_path / "t"), str(tmp_path / "x"), "--layers", "9"]
    )
    assert isinstance(res.exception, ConfigError) and not (tmp_path / "x").exists()
