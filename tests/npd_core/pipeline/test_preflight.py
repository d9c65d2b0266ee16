"""Checks before a run: bad models, tokenizers and prompts fail with one line, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from npd_core.config import NPDConfig
from npd_core.data import Prompt
from npd_core.errors import ConfigError, DataError, ModelError
from npd_core.pipeline.preflight import check_overlap, check_run


def _args(w):
    return [str(w.teacher), str(w.student), str(w.train_prompts), {"heldout": str(w.eval_prompts)}]


def test_valid_world_passes(tiny_world):
    train, held = check_run(NPDConfig(), *_args(tiny_world))
    assert len(train) == 128 and {k: len(v) for k, v in held.items()} == {"heldout": 64}


def test_every_eval_set_is_read_and_a_missing_one_is_named_by_its_field(tiny_world, tmp_path):
    a = _args(tiny_world)
    sets = {"sorted": str(tiny_world.eval_prompts), "gone": str(tmp_path / "gone.jsonl")}
    cfg = NPDConfig(eval={"sets": sets})
    with pytest.raises(DataError, match=r"^eval\.sets\.gone: .*gone\.jsonl"):
        check_run(cfg, *a[:3], sets)
    sets["gone"] = sets["sorted"]
    _, held = check_run(cfg, *a[:3], sets)
    assert {k: len(v) for k, v in held.items()} == {"sorted": 64, "gone": 64}


def test_missing_and_non_hf_checkpoint(tiny_world, tmp_path):
    a = _args(tiny_world)
    with pytest.raises(ModelError, match="models.teacher: .*does not exist"):
        check_run(NPDConfig(), str(tmp_path / "gone"), *a[1:])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="models.student: .*no config.json"):
        check_run(NPDConfig(), a[0], str(tmp_path / "empty"), *a[2:])


def test_unknown_architecture(tiny_world, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_world.student, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (bad / "config.json").write_text(json.dumps(cfg))
    a = _args(tiny_world)
    with pytest.raises(ModelError, match="models.student: .*config.json"):
        check_run(NPDConfig(), a[0], str(bad), *a[2:])


def test_vocab_mismatch(tiny_world, tmp_path):
    bad = tmp_path / "other"
    shutil.copytree(tiny_world.student, bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["model"]["vocab"]["#"] = len(tok["model"]["vocab"])
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    a = _args(tiny_world)
    with pytest.raises(ModelError, match="different vocabularies"):
        check_run(NPDConfig(), a[0], str(bad), *a[2:])


def test_prompt_too_long_for_context_and_rows(tiny_world, tmp_path):
    a = _args(tiny_world)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "big", "prompt": "1," * 300 + "=", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match="prompt 'big' has 601 tokens"):
        check_run(NPDConfig(), *a[:2], str(long), a[3])
    long.write_text(json.dumps({"id": "big", "prompt": "1," * 20 + "="}) + "\n")  # 41 tokens
    with pytest.raises(ConfigError, match="pack.max_seq_len=16 .* prompt 'big'"):
        check_run(NPDConfig(pack={"max_seq_len": 16}), *a[:2], str(long), a[3])


def test_overlap_of_train_and_eval_sets_is_refused_or_warned_with_its_count():
    """Held-out prompts that are also train prompts (exact text): a DataError naming the set,
    the count and the first id; with ``allow`` one warning per set instead."""
    train = [Prompt("t1", "1,2="), Prompt("t2", "3,4=")]
    sets = {"eval.sets.a": [Prompt("x", "3,4="), Prompt("y", "5=")], "eval.sets.b": [train[0]]}
    with pytest.raises(DataError, match=r"eval.sets.a: 1 of its 2 prompts .*first id 'x'"):
        check_overlap(train, sets, allow=False)
    with pytest.warns(UserWarning) as seen:
        check_overlap(train, sets, allow=True)
    assert [str(w.message) for w in seen] == [
        "eval.sets.a: 1 of its 2 prompts are also train prompts (data.allow_overlap: true)",
        "eval.sets.b: 1 of its 1 prompts are also train prompts (data.allow_overlap: true)",
    ]
