"""Checks run before a run starts, so a bad input fails in seconds with one clear line instead
of at 3 a.m. in round 5, and before anything is written to the store."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from npd_core.backends import vllm as vllm_backend
from npd_core.config import NPDConfig
from npd_core.data import Prompt, read_prompts, shared_prompts
from npd_core.errors import ConfigError, DataError, ModelError
from npd_core.method.answers import metric_fn
from npd_core.models import format_prompts, load_tokenizer, prompt_texts


def _model_config(path: str, role: str) -> dict:
    """config.json of a checkpoint whose architecture transformers can load as a causal LM."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"models.{role}: {p} does not exist; give an HF checkpoint directory")
    f = p / "config.json"
    if not f.is_file():
        raise ModelError(f"models.{role}: {p} is not an HF checkpoint (no config.json)")
    try:
        raw = json.loads(f.read_text())
        cfg = AutoConfig.from_pretrained(p)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"models.{role}: {f} is not valid JSON; re-save the checkpoint") from None
    except Exception as e:  # transformers' own validators raise their own types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"models.{role}: {f}: transformers cannot load this ({first})") from None
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(
            f"models.{role}: {f}: model_type {cfg.model_type!r} has no causal-LM "
            "class in transformers; npd distils decoder-only LMs"
        )
    return raw


def _fits_in_memory(cfg_json: dict, role: str, path: str) -> None:
    """Refuse a checkpoint whose fp32 weights (+ Adam state for the student) exceed RAM."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    h, n_layers = cfg_json.get("hidden_size", 0), cfg_json.get("num_hidden_layers", 0)
    inter, vocab = cfg_json.get("intermediate_size", 4 * h), cfg_json.get("vocab_size", 0)
    params = n_layers * (4 * h * h + 3 * h * inter) + 2 * vocab * h
    need = params * 4 * (4 if role == "student" else 1)
    if need > pages * size:
        raise ModelError(
            f"models.{role}: {path} needs ~{need / 2**30:.1f} GiB in float32 "
            f"(+ optimizer), more than this machine's {pages * size / 2**30:.1f} GiB"
        )


def check_backends(cfg: NPDConfig) -> None:
    """A backend asked for by name must be installed: checked before any model is built."""
    vllm_backend.resolve(cfg.generate.backend, "generate.backend")
    vllm_backend.resolve(cfg.score.backend or cfg.generate.backend, "score.backend")


def check_run(
    cfg: NPDConfig, teacher: str, student: str, train: str, eval_sets: dict[str, str]
) -> tuple[list[Prompt], dict[str, list[Prompt]]]:
    """Validate models, tokenizers and prompt files (train, and each eval set by name) against
    the config; returns the train prompts and each eval set's."""
    check_backends(cfg)
    cfgs = {}
    for role, path in (("teacher", teacher), ("student", student)):
        cfgs[role] = _model_config(path, role)
        _fits_in_memory(cfgs[role], role, path)
    tok_t, tok_s = load_tokenizer(teacher), load_tokenizer(student)
    if tok_t.get_vocab() != tok_s.get_vocab():
        raise ModelError(
            f"models: teacher ({teacher}) and student ({student}) tokenizers have "
            f"different vocabularies ({len(tok_t)} vs {len(tok_s)} tokens); npd needs "
            "one shared tokenizer (no vocabulary mapping is configured)"
        )
    prompts = read_prompts(train, **cfg.data.reader_options())
    fields = {name: eval_set_field(cfg, name) for name in eval_sets}
    evals = {name: _read_set(fields[name], path, cfg) for name, path in eval_sets.items()}
    check_overlap(prompts, {fields[n]: ps for n, ps in evals.items()}, cfg.data.allow_overlap)
    for metric in (cfg.eval.metric, *cfg.eval.also):  # a user's metric is imported now
        metric_fn(metric, cfg.eval.answer_regex)
    context = min(c.get("max_position_embeddings") or 1 << 30 for c in cfgs.values())
    for name, ps in (("data.prompts", prompts), *((fields[n], ps) for n, ps in evals.items())):
        ids = _formatted(tok_s, student, name, ps, cfg.data.chat_template)
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        n = len(ids[longest])
        if n + cfg.generate.max_new_tokens > context:
            raise DataError(
                f"{name}: prompt {ps[longest].id!r} has {n} tokens; with "
                f"generate.max_new_tokens={cfg.generate.max_new_tokens} it exceeds the "
                f"models' context of {context}; shorten it or lower max_new_tokens"
            )
        if n >= cfg.pack.max_seq_len:
            raise ConfigError(
                f"pack.max_seq_len={cfg.pack.max_seq_len} is not longer than prompt "
                f"{ps[longest].id!r} ({n} tokens) of {name}; raise pack.max_seq_len"
            )
    return prompts, evals


def eval_set_field(cfg: NPDConfig, name: str) -> str:
    """The config field an eval set comes from, as error messages name it."""
    return f"eval.sets.{name}" if cfg.eval.sets else "data.eval_prompts"


def _read_set(field: str, path: str, cfg: NPDConfig) -> list[Prompt]:
    try:
        return read_prompts(path, **cfg.data.reader_options())
    except DataError as err:
        raise DataError(f"{field}: {err}") from None


def check_overlap(train: list[Prompt], sets: dict[str, list[Prompt]], allow: bool) -> None:
    """Held-out prompts that are also train prompts (exact text) measure memory, not skill:
    refused, or with ``data.allow_overlap`` one warning per set with their count."""
    for name, held_out in sets.items():
        shared = shared_prompts(train, held_out)
        if not shared:
            continue
        what = f"{name}: {len(shared)} of its {len(held_out)} prompts are also train prompts"
        if not allow:
            raise DataError(
                f"{what} (exact text, first id {shared[0]!r}); remove them from one of the "
                "sets, or set data.allow_overlap: true to accept them"
            )
        warnings.warn(f"{what} (data.allow_overlap: true)", UserWarning, stacklevel=2)


def _formatted(
    tok: Any, where: str, name: str, prompts: list[Prompt], chat_template: str
) -> list[list[int]]:
    """Token ids of a prompt set; a prompt the chat template of the tokenizer at ``where``
    cannot format is named by id."""
    try:
        return format_prompts(tok, [p.prompt for p in prompts], chat_template)
    except DataError:
        for p in prompts:  # find the first one at fault
            try:
                prompt_texts(tok, [p.prompt], chat_template)
            except DataError as err:
                raise DataError(f"{name}: prompt {p.id!r}: {err} (tokenizer: {where})") from None
        raise
