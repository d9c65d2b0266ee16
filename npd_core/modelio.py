"""Models as users keep them: GGUF files converted once into plain HF checkpoints, and students
made from a teacher by depth pruning (the usual prune-then-distill recipe).

A GGUF file loads through transformers' own GGUF reader (dequantised; it needs the ``gguf`` and
``accelerate`` packages of the smol extra), but such a model refuses ``save_pretrained`` and
carries a ``quantization_config``. :func:`import_gguf` rebuilds it as a plain model from the same
config without that entry and the same weights, so every stage loads it like any checkpoint.
A run that names a ``.gguf`` file converts it once, cached by the file's digest
(:func:`local_model`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from npd_core.errors import ConfigError, ModelError, first_line
from npd_core.models import _LOAD_LOCK, load_model, load_tokenizer, save_checkpoint

SMOL_EXTRA = ("gguf", "accelerate")
SMOL_INSTALL = "run `make smol` (or pip install -e '.[smol]')"
GGUF_CACHE = "models"  # under the output directory: models/gguf-<digest>/
Pick = Literal["first", "stride", "last-k"]
PICKS: tuple[Pick, ...] = ("first", "stride", "last-k")
# a decoder layer's parameter: "<prefix>.layers.<i>.<rest>" (model.layers.3.mlp.up_proj.weight)
_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..+)$")


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def require_smol_extra(what: str) -> None:
    """One ``error:`` line naming the extra to install when gguf or accelerate is missing."""
    missing = [m for m in SMOL_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"{what} needs the smol extra ({', '.join(missing)} not installed); {SMOL_INSTALL}"
        )


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits), the cache key of its conversion."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def import_gguf(gguf: str | Path, out: str | Path) -> Path:
    """Convert ``gguf`` into a plain HF checkpoint at ``out`` (float32 weights as transformers
    dequantises them, its tokenizer, no ``quantization_config``); written atomically."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelError(f"{gguf}: no such GGUF file")
    require_smol_extra(f"{gguf}: reading a GGUF file")
    try:
        with _LOAD_LOCK:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise ModelError(
            f"{gguf}: transformers cannot load this GGUF file ({first_line(err)})"
        ) from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return save_checkpoint(plain.eval(), tok, Path(out))


def local_model(path: str, cache: str | Path) -> str:
    """``path`` itself, or for a ``.gguf`` file its plain checkpoint under ``cache``
    (``gguf-<digest>/``), converted on first use: the same file is converted once."""
    if not is_gguf(path):
        return path
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such GGUF file; give a .gguf file or an HF checkpoint dir")
    target = Path(cache) / f"gguf-{file_digest(p)}"
    if not (target / "config.json").is_file():
        import_gguf(p, target)
    return str(target)


def picked_layers(n: int, k: int, pick: Pick = "first") -> list[int]:
    """The ``k`` decoder layers of ``n`` a pruned student keeps, in order: the first ``k``
    (default; it beat every fourth layer on SmolLM2), every ``n/k``-th from layer 0
    (``stride``), or the last ``k`` (``last-k``)."""
    if pick not in PICKS:
        raise ConfigError(f"--pick {pick}: unknown; choose from {', '.join(PICKS)}")
    if not 1 <= k <= n:
        raise ConfigError(f"--layers {k}: the model has {n} decoder layers; choose 1 to {n}")
    if pick == "first":
        return list(range(k))
    if pick == "stride":
        return [i * n // k for i in range(k)]
    return list(range(n - k, n))


def pruned(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A new model of the same class with decoder layers ``keep`` of ``model`` (renumbered
    0..k-1), its embeddings, final norm and head: ``num_hidden_layers`` and every per-layer
    list of the config (a list with one entry per layer, e.g. ``layer_types``) cut to match."""
    n = model.config.num_hidden_layers
    config = copy.deepcopy(model.config)
    for key, value in model.config.to_dict().items():
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value
        elif int(m[2]) in new_index:
            state[f"{m[1]}{new_index[int(m[2])]}{m[3]}"] = value
    dtype = next(model.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval()


def prune(teacher: str | Path, out: str | Path, layers: int, pick: Pick = "first") -> Path:
    """Write a depth-pruned student of the HF checkpoint ``teacher`` to ``out``: weights in the
    teacher's dtype, its tokenizer; plain ``from_pretrained`` loads it."""
    if is_gguf(teacher):
        raise ModelError(
            f"{teacher}: prune reads an HF checkpoint; convert the GGUF file first with "
            "`npd models import FILE.gguf DIR`"
        )
    model = load_model(teacher, "auto")
    keep = picked_layers(model.config.num_hidden_layers, layers, pick)
    return save_checkpoint(pruned(model, keep), load_tokenizer(teacher), Path(out))
