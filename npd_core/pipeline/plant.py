"""Planted junk inside a training run (``generate.plant_junk``, an aid of the filter study):
a known share of each round's samples replaced by junk whose kind is recorded, so that a filter
rule can be judged by what it drops and trains on. Two kinds, in equal parts, as the
planted-junk bench (:mod:`npd_core.bench.junk`) defines them:

- ``stale``: the same prompt's sample from θ₀ (the run's initial student) with the same seed, its
  generator log-probs θ₀'s own sampling ones (in a round that θ₀ generates, the student's own
  sample: the same seed gives the same tokens);
- ``loop``: the sample's first line repeated up to ``generate.max_new_tokens`` (no EOS), its
  generator log-probs those the round's generator gives the looped tokens.

Which samples: the round's (prompt id, sample index) pairs ordered by a seeded hash of (run seed,
round, pair); the first ``round(plant_junk × pairs)`` are junk, the first half of them stale. So
any shard count, a retried round and every run with the same seed (same prompts) plant the same
junk. Sequences of a fixed source (``data.mix``) are never replaced. The rows keep
``samples.source`` ``junk-stale`` or ``junk-loop``: they have a generator, so every score, rule
and train-step weight treats them as the student's samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from npd_core.config import NPDConfig
from npd_core.data import Prompt
from npd_core.method.generate import Generation, apply_stop_strings
from npd_core.method.score import score
from npd_core.models import frozen_dtype, load_model, use_bf16
from npd_core.pipeline.engines import Progress, generate_with
from npd_core.pipeline.mix import is_mixed
from npd_core.pipeline.spec import RunSpec, generator_round, rel_path
from npd_core.seeds import seed_for

KINDS = ("stale", "loop")


def loop_of(response: list[int], newline: int | None, eos: int, cap: int) -> list[int]:
    """The response's first line (through its newline; the whole response less EOS when it
    has none) repeated and cut at ``cap`` tokens: a looping sample that never ends."""
    body = [t for t in response if t != eos] or response
    line = body[: body.index(newline) + 1] if newline in body else body
    return (line * (cap // max(len(line), 1) + 1))[:cap]


def junk_plan(cfg: NPDConfig, r: int, prompts: list[Prompt]) -> dict[tuple[str, int], str]:
    """The kind of junk (``stale`` / ``loop``) of each planted (prompt id, sample index) of
    round ``r``; ``prompts`` are the whole round's, before any shard is taken."""
    share = cfg.generate.plant_junk
    if share <= 0:
        return {}
    n = cfg.generate.n_per_prompt
    pairs = [(p.id, k) for p in prompts for k in range(n) if not is_mixed(cfg, r, p.id, k)]
    pairs.sort(key=lambda pk: seed_for(cfg.seed, "plant-junk", r, *pk))
    chosen = pairs[: round(share * len(pairs))]
    half = len(chosen) // 2
    return {pk: KINDS[i >= half] for i, pk in enumerate(chosen)}


@dataclass(frozen=True)
class Junk:
    """One planted sample, in the student's stead."""

    kind: str  # stale | loop
    token_ids: list[int]
    text: str
    finished: bool
    logprobs: list[float]  # its generator's, per token
    generator: str  # the checkpoint that gives those log-probs (relative to the output dir)


def junk_sequences(
    spec: RunSpec,
    r: int,
    plan: dict[tuple[str, int], str],
    backend: str,
    tok: Any,
    prompts: list[Prompt],
    ids: list[list[int]],
    seeds: list[list[int]],
    gens: list[list[Generation]],
    progress: Progress = None,
) -> dict[tuple[str, int], Junk]:
    """The junk of the planted pairs among ``prompts`` (this stage's; ``gens[i][k]`` the
    student's sample of prompt i, ``seeds[i][k]`` its seed)."""
    cfg = spec.cfg
    todo = [
        (i, k, plan[(p.id, k)])
        for i, p in enumerate(prompts)
        for k in range(len(gens[i]))
        if (p.id, k) in plan
    ]
    if not todo:
        return {}
    g = cfg.generate
    decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    ckpt = spec.checkpoint(generator_round(r, cfg.staleness))
    theta0 = spec.checkpoint(0)
    stale = [(i, k) for i, k, kind in todo if kind == "stale"]
    old: list[Generation] = []
    if ckpt == theta0:  # θ₀ generates this round: its sample of the same seed is the student's
        old = [gens[i][k] for i, k in stale]
    elif stale:
        one = cfg.model_copy(update={"generate": g.model_copy(update={"n_per_prompt": 1})})
        job_ids, job_seeds = [ids[i] for i, _ in stale], [[seeds[i][k]] for i, k in stale]
        sampled, _ = generate_with(backend, theta0, tok, job_ids, job_seeds, one, progress)
        old = [x for (x,) in sampled]
    out = {}
    for (i, k), gen in zip(stale, old, strict=True):
        gen, text = apply_stop_strings(gen, decode, cfg.data.stop)
        out[(prompts[i].id, k)] = Junk(
            "stale", gen.token_ids, text, gen.finished, gen.logprobs, rel_path(spec.root, theta0)
        )
    loops = [(i, k) for i, k, kind in todo if kind == "loop"]
    if loops:
        nl = tok.get_vocab().get("\n")
        looped = [
            loop_of(
                apply_stop_strings(gens[i][k], decode, cfg.data.stop)[0].token_ids,
                nl,
                tok.eos_token_id,
                g.max_new_tokens,
            )
            for i, k in loops
        ]
        lps = score(
            load_model(ckpt, frozen_dtype(cfg.models.frozen_dtype)),
            [ids[i] for i, _ in loops],
            looped,
            view=None,
            top_k=None,
            batch_tokens=cfg.score.batch_tokens,
            bf16=use_bf16(cfg.models.bf16),
            stage="generate (plant_junk loops)",
        ).token_logprobs
        assert lps is not None
        for (i, k), y, lp in zip(loops, looped, lps, strict=True):
            out[(prompts[i].id, k)] = Junk(
                "loop", y, decode(y), False, lp.tolist(), rel_path(spec.root, ckpt)
            )
    return out


def planted_in(
    rows: list[dict[str, Any]], junk: dict[tuple[str, int], Junk], per_token: bool
) -> None:
    """Put the junk in place of the student's samples in the generate stage's ``rows`` (one per
    prompt id and sample index), each with its source; ``per_token``: the rows keep their
    generator's per-token log-probs (``samples.token_logprobs``)."""
    for row in rows:
        j = junk.get((row["prompt_id"], row["sample_idx"]))
        if j is None:
            continue
        row.update(
            response=j.text,
            response_token_ids=j.token_ids,
            response_tokens=len(j.token_ids),
            finished=j.finished,
            sample_logprob_sum=float(sum(j.logprobs)),
            generator_checkpoint=j.generator,
            source=f"junk-{j.kind}",
            token_logprobs=j.logprobs if per_token else None,
        )
