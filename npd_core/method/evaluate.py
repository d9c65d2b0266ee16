"""Held-out evaluation: greedy decoding, then the run's ``eval.metric`` (``answers.METRICS``:
exact, normalized, contains, regex, boxed, gsm8k, final_line or the user's own function) in
points (0–100), or, where prompts have no reference answer, the teacher's mean log-likelihood per
token of the greedy answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from transformers import PreTrainedModel

from npd_core.method.answers import STORED_NAMES, metric_fn
from npd_core.method.batching import memory_budget
from npd_core.method.generate import generate
from npd_core.method.score import score
from npd_core.models import use_bf16

if TYPE_CHECKING:  # read by attribute: the method runs without pydantic
    from npd_core.config import NPDConfig


@dataclass
class EvalResult:
    score: float  # mean metric in points, or mean teacher log-likelihood per token
    metric: str  # "exact_match" (eval.metric exact), the eval.metric, or "teacher_loglik"
    correct: np.ndarray  # (N,) metric per prompt, 1.0 = match (all 0 for teacher_loglik)
    responses: list[str]


def greedy_responses(
    model: PreTrainedModel,
    tok,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    bf16: bool,
    memory: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy response token ids, EOS stripped; ``memory``: the decoding budget in bytes
    (``method.batching``), None = ``batch_size`` rows whatever they take."""
    eos = {tok.eos_token_id}
    gens = generate(
        model,
        prompt_ids,
        n_per_prompt=1,
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        pad_id=tok.pad_token_id,
        temperature=0.0,
        top_p=1.0,
        seeds=None,
        batch_size=batch_size,
        bf16=bf16,
        memory=memory,
        stage="evaluate",
        progress=progress,
    )
    return [[t for t in g[0].token_ids if t not in eos] for g in gens]


def greedy_decoded(
    model: PreTrainedModel,
    tok,
    prompt_ids: list[list[int]],
    cfg: NPDConfig,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Greedy responses with the run's eval settings: token ids (EOS stripped) and their text.
    The evaluate stage and the TRL peer score checkpoints through this one function."""
    resp = greedy_responses(
        model,
        tok,
        prompt_ids,
        max_new_tokens=cfg.eval.max_new_tokens or cfg.generate.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        bf16=use_bf16(cfg.models.bf16),
        memory=memory_budget(cfg.eval.memory_gb, next(model.parameters()).device),
        progress=progress,
    )
    return resp, [tok.decode(x, skip_special_tokens=True) for x in resp]


def exact_match(
    responses: list[str], answers: list[str], metric: str = "exact", answer_regex: str | None = None
) -> EvalResult:
    """Points (0–100): the mean of ``metric`` (``answers.metric_fn``) over the responses, each
    graded against its reference answer."""
    fn = metric_fn(metric, answer_regex)
    correct = np.array(
        [float(fn(r, a)) for r, a in zip(responses, answers, strict=True)], dtype=np.float64
    )
    name = STORED_NAMES.get(metric, metric)
    return EvalResult(
        100.0 * float(correct.mean()) if len(correct) else 0.0, name, correct, responses
    )


def teacher_loglik(
    teacher: PreTrainedModel,
    prompt_ids: list[list[int]],
    responses: list[list[int]],
    texts: list[str],
    *,
    eos_id: int,
    batch_tokens: int,
    bf16: bool,
    memory: int | None = None,
) -> EvalResult:
    """The teacher's mean log-likelihood per token of the greedy answers (EOS included): the
    held-out score where prompts have no reference answer to match."""
    scores = score(
        teacher,
        prompt_ids,
        [x + [eos_id] for x in responses],
        view=None,
        top_k=None,
        batch_tokens=batch_tokens,
        bf16=bf16,
        memory=memory,
        stage="evaluate",
    )
    n = sum(len(x) + 1 for x in responses)
    value = float(scores.cond_logprob_sum.sum() / n)
    return EvalResult(value, "teacher_loglik", np.zeros(len(responses)), texts)
