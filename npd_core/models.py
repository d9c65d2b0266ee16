"""Loading, formatting and checkpointing HF causal LMs.

A checkpoint is a plain HF directory (``save_pretrained`` of model and tokenizer) plus
``trainer_state.pt`` (optimizer, step, RNG) so a round can be resumed exactly. It is written to a
hidden temp directory and renamed into place, so readers never see half a checkpoint.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jinja2 import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from npd_core.atomic import atomic_dir
from npd_core.errors import DataError, ModelError
from npd_core.iotime import timed

if TYPE_CHECKING:  # a bare GPU box has no pyarrow, which npd_core.data needs
    from npd_core.data import Turn

TRAINER_STATE = "trainer_state.pt"
hf_logging.disable_progress_bar()  # our own progress bars; HF's per-load bars are noise
# from_pretrained builds the model on the meta device through process-global state: two stages
# loading at once in two threads (overlapping rounds) corrupt each other's load. One at a time.
_LOAD_LOCK = threading.Lock()


def load_tokenizer(path: str | Path) -> Any:
    p = Path(path)
    if not (p / "tokenizer_config.json").is_file() and not (p / "tokenizer.json").is_file():
        raise ModelError(
            f"{p}: no tokenizer found (tokenizer.json); point to an HF model directory"
        )
    tok = AutoTokenizer.from_pretrained(p)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def frozen_dtype(setting: str) -> torch.dtype:
    """``models.frozen_dtype`` resolved: a model that only runs forward (teacher, generator
    snapshot, evaluation) needs no float32 master copy; auto = bfloat16 on CUDA, float32 on CPU
    (where bf16 is mostly emulated, see ``use_bf16``)."""
    if setting == "auto":
        return torch.bfloat16 if device().type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


@timed
def load_model(
    path: str | Path, dtype: torch.dtype | Literal["auto"] = torch.float32
) -> PreTrainedModel:
    """Load an HF causal LM on CPU/GPU with weights in ``dtype``: float32 for a learner (master
    weights; autocast does the bf16 compute), ``frozen_dtype`` for a model that only runs
    forward, ``auto`` for the dtype it was saved in (a pruned copy keeps it)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: not an HF checkpoint (no config.json); give a save_pretrained dir")
    try:
        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    except (ValueError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{p}: cannot load as a causal LM ({first})") from None
    return model.to(device())


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(setting: bool | str) -> bool:
    """``models.bf16`` resolved: ``auto`` is bf16 autocast on CUDA and float32 on CPU."""
    return device().type == "cuda" if setting == "auto" else bool(setting)


def autocast(enabled: bool, dev: torch.device | None = None) -> AbstractContextManager:
    """bf16 autocast on ``dev`` (default: the current device); a no-op context when disabled."""
    if not enabled:
        return nullcontext()
    return torch.autocast((dev or device()).type, dtype=torch.bfloat16)


def start_token_id(tok: Any) -> int:
    """The token that precedes a response scored without its prompt (BOS, else EOS)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def view_prefix(tok: Any, view: str, text: str, chat_template: str) -> list[int]:
    """Token ids that precede a response scored without its prompt (``filter.view``): BOS, EOS,
    or ``text`` formatted as a prompt like the real ones (BOS where that gives no token)."""
    if view == "eos":
        return [tok.eos_token_id]
    if view == "prompt":
        ids = format_prompts(tok, [text], chat_template)[0]
        if ids:
            return ids
    return [start_token_id(tok)]


def templated(tok: Any, chat_template: str) -> bool:
    """Whether prompts go through the tokenizer's chat template (``data.chat_template``)."""
    return chat_template == "auto" and bool(getattr(tok, "chat_template", None))


def prompt_texts(
    tok: Any, prompts: Sequence[str | Sequence[Turn]], chat_template: str
) -> list[str]:
    """The exact text each prompt is tokenised from: its turns (a string is one user turn)
    through the chat template with ``add_generation_prompt``, or a string itself when no
    template applies. A conversation without a template is a DataError."""
    if not templated(tok, chat_template):
        if any(not isinstance(p, str) for p in prompts):
            why = "data.chat_template is none" if chat_template == "none" else "it has none"
            raise DataError(
                f"conversational prompts need the tokenizer's chat template and {why}; "
                "set data.chat_template: auto with a tokenizer that has a template, or give "
                "plain prompt strings"
            )
        return list(prompts)
    texts = []
    for p in prompts:
        turns = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        try:
            texts.append(tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
        except TemplateError as err:
            raise DataError(f"the tokenizer's chat template refused a prompt ({err})") from None
    return texts


def encode_prompts(tok: Any, texts: list[str], chat_template: str) -> list[list[int]]:
    """Token ids of ``prompt_texts``: a rendered template holds its special tokens as text (as
    ``apply_chat_template(tokenize=True)`` encodes it); a raw prompt gets the tokenizer's own."""
    special = not templated(tok, chat_template)
    return [tok(t, add_special_tokens=special)["input_ids"] for t in texts]


def format_prompts(
    tok: Any, prompts: Sequence[str | Sequence[Turn]], chat_template: str
) -> list[list[int]]:
    """Token ids of each prompt, through the chat template when asked for and present."""
    return encode_prompts(tok, prompt_texts(tok, prompts, chat_template), chat_template)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


SHARD_SIZE = "2GB"  # safetensors shards above this (an index file names them): any disk copes


@timed
def save_checkpoint(
    model: PreTrainedModel,
    tok: Any,
    path: Path,
    trainer_state: dict[str, Any] | None = None,
    max_shard_size: str | int = SHARD_SIZE,
) -> Path:
    """Write model + tokenizer (+ optimizer/RNG state) to ``path`` atomically (see atomic_dir);
    weights above ``max_shard_size`` go to several safetensors shards that plain
    ``from_pretrained`` loads."""
    path = Path(path)
    with atomic_dir(path, pause_at=f"checkpoint:{path.name}") as tmp:
        with _LOAD_LOCK:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            tok.save_pretrained(tmp)
        if trainer_state is not None:
            with open(tmp / TRAINER_STATE, "wb") as f:  # closed on a failed write (a path is not)
                torch.save(trainer_state, f)
    return path


@timed
def load_trainer_state(path: Path) -> dict[str, Any] | None:
    f = Path(path) / TRAINER_STATE
    return torch.load(f, weights_only=False) if f.is_file() else None


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
