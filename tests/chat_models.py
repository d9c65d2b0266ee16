"""The chat model family of the docs' worked example (``examples/chat_gsm8k.py``: tiny Llama
checkpoints, a byte-level tokenizer with a Jinja chat template that has a system turn), for the
tests; examples/ is no package, so it is loaded from its file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chat_gsm8k.py"
_spec = importlib.util.spec_from_file_location("chat_gsm8k", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
chat_tokenizer = example.chat_tokenizer
