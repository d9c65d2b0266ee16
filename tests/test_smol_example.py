"""The docs' worked example on real models (examples/smol_chat.py): the config the docs print is
the one the script writes, and it loads with the smol world's answer pattern. The run itself
needs the smol world (a 19-minute build); tests/flows/test_smol.py runs the pair."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

from npd_core.config import NPDConfig
from npd_core.toy.smol import ANSWER_REGEX

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "data-and-eval.md"


def _example():
    spec = importlib.util.spec_from_file_location("smol_chat", ROOT / "examples" / "smol_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(lang: str) -> str:
    text = DOCS.read_text()
    text = text[text.index("### Worked example") : text.index("### Without a download")]
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


def test_the_docs_print_the_config_the_smol_example_writes():
    example = _example()
    assert _block("yaml") == example.CONFIG
    cfg = NPDConfig.model_validate(yaml.safe_load(example.CONFIG))
    assert cfg.eval.answer_regex == ANSWER_REGEX  # the quotes in the pattern survive YAML
    assert cfg.eval.metric == "regex" and list(cfg.eval.sets) == ["sums", "letters"]
    commands = [c.split("#")[0].split() for c in _block("bash").strip().splitlines()]
    assert commands[1][:2] == [".venv/bin/python", "examples/smol_chat.py"]
    assert commands[2][:2] == [".venv/bin/npd", "run"]
