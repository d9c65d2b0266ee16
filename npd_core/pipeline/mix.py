"""Mixed data (``data.mix``, GKD's λ): a fraction of each round's training sequences comes from
a fixed source instead of the student, the teacher's own samples or the reference answers.

Which sequences: sample k of prompt p in round r is mixed in when a seeded coin of (run seed,
r, p, k) falls under ``data.mix.fraction``, so the choice is the same for any shard count or
order. What replaces it: the teacher's sample of (p, k) (``temperature`` 1, no top-p, its own
seed, independent of the round: the same fixed sequence every round, taken from an earlier
round's samples when one has it, decoded once otherwise, with the HF engine whatever
``generate.backend`` says), or the reference answer with EOS.
The student samples only the other pairs (each from its own seed, as without the mix).
Either source is scored by the teacher and trained like any sample; it has no generator, so the
sampled-token loss skips it (``samples.token_logprobs`` null).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from npd_core.config import NPDConfig
from npd_core.data import Prompt
from npd_core.errors import ConfigError
from npd_core.method.generate import Generation, apply_stop_strings, generate
from npd_core.models import frozen_dtype, load_model, use_bf16
from npd_core.pipeline.spec import RunSpec, rel_path
from npd_core.seeds import seed_for

COIN = 2**63  # seed_for's range
FIXED_SOURCES = ("teacher", "reference")  # samples.source of a sequence without a generator


def fixed_mask(samples: Any) -> list[bool]:
    """Per row of a samples table: a fixed source's sequence, without a generator (tables
    written before schema 6 have no ``source``: every row is the student's)."""
    if "source" not in samples.schema.names:
        return [False] * len(samples)
    return [x in FIXED_SOURCES for x in samples.column("source").to_pylist()]


@dataclass(frozen=True)
class Fixed:
    """One training sequence from the fixed source, in the student's stead."""

    token_ids: list[int]
    text: str
    finished: bool
    logprob_sum: float | None  # the teacher's own log-prob of its sample; None: a reference
    seed: int | None  # the teacher's sampling seed; None: a reference
    generator: str  # the teacher's path (relative to the output directory), or "reference"


def is_mixed(cfg: NPDConfig, r: int, prompt_id: str, k: int) -> bool:
    """Whether sample ``k`` of ``prompt_id`` in round ``r`` comes from the fixed source."""
    f = cfg.data.mix.fraction
    return f > 0 and seed_for(cfg.seed, "mix", r, prompt_id, k) < f * COIN


def fixed_sequences(
    spec: RunSpec,
    r: int,
    prompts: list[Prompt],
    ids: list[list[int]],
    tok: Any,
    n_per_prompt: int,
) -> dict[tuple[str, int], Fixed]:
    """The fixed source's sequence for each (prompt id, sample index) of round ``r`` that
    :func:`is_mixed` picks (``ids``: the prompts' token ids)."""
    cfg = spec.cfg
    pairs = [
        (i, k)
        for i, p in enumerate(prompts)
        for k in range(n_per_prompt)
        if is_mixed(cfg, r, p.id, k)
    ]
    if cfg.data.mix.source == "reference":
        return {(prompts[i].id, k): _reference(prompts[i], tok) for i, k in pairs}
    cached = _earlier_teacher_samples(spec, r) if pairs else {}
    out = {
        (prompts[i].id, k): cached[(prompts[i].id, k)]
        for i, k in pairs
        if (prompts[i].id, k) in cached
    }
    todo = [(i, k) for i, k in pairs if (prompts[i].id, k) not in out]
    if todo:
        seeds = [seed_for(cfg.seed, "mix", None, prompts[i].id, k) for i, k in todo]
        model = load_model(spec.teacher, frozen_dtype(cfg.models.frozen_dtype))
        g = cfg.generate
        gens = generate(
            model,
            [ids[i] for i, _ in todo],
            n_per_prompt=1,
            max_new_tokens=g.max_new_tokens,
            eos_ids={tok.eos_token_id},
            pad_id=tok.pad_token_id,
            temperature=1.0,
            top_p=1.0,
            seeds=[[s] for s in seeds],
            batch_size=g.batch_size,
            bf16=use_bf16(cfg.models.bf16),
            stage="generate (data.mix teacher)",
        )
        teacher = rel_path(spec.root, spec.teacher)
        for (i, k), seed, (gen,) in zip(todo, seeds, gens, strict=True):
            gen, text = apply_stop_strings(
                gen, lambda t: tok.decode(t, skip_special_tokens=True), cfg.data.stop
            )
            out[(prompts[i].id, k)] = Fixed(
                gen.token_ids, text, gen.finished, gen.logprob_sum, seed, teacher
            )
    return out


def student_pairs(
    prompts: list[Prompt], n_per_prompt: int, fixed: dict[tuple[str, int], Fixed]
) -> list[tuple[int, int]]:
    """The (prompt index, sample index) pairs the student still samples: all but the fixed
    source's, so a mixed-in sequence costs no student decoding."""
    return [
        (i, k) for i, p in enumerate(prompts) for k in range(n_per_prompt) if (p.id, k) not in fixed
    ]


def merged(
    prompts: list[Prompt],
    n_per_prompt: int,
    pairs: list[tuple[int, int]],
    sampled: list[list[Generation]],
    fixed: dict[tuple[str, int], Fixed],
) -> list[list[Generation]]:
    """The student's generations of ``pairs`` (one each, in order) and the fixed source's
    sequences, as ``out[prompt index][sample index]`` (:func:`mixed_in` then marks the latter)."""
    got = {pair: g for pair, (g,) in zip(pairs, sampled, strict=True)}
    return [
        [
            got[(i, k)]
            if (i, k) in got
            else Generation(fixed[(p.id, k)].token_ids, [], fixed[(p.id, k)].finished)
            for k in range(n_per_prompt)
        ]
        for i, p in enumerate(prompts)
    ]


def mixed_in(rows: list[dict[str, Any]], fixed: dict[tuple[str, int], Fixed]) -> None:
    """Put the fixed source's sequences in place of the student's in the generate stage's
    ``rows`` (one per prompt id and sample index), each with its source."""
    for row in rows:
        f = fixed.get((row["prompt_id"], row["sample_idx"]))
        if f is None:
            continue
        teacher = f.seed is not None
        row.update(
            response=f.text,
            response_token_ids=f.token_ids,
            response_tokens=len(f.token_ids),
            finished=f.finished,
            sample_logprob_sum=f.logprob_sum,
            seed=f.seed,
            generator_checkpoint=f.generator,
            backend="hf" if teacher else "reference",
            temperature=1.0 if teacher else 0.0,
            top_p=1.0,
            source="teacher" if teacher else "reference",
            token_logprobs=None,  # no generator: the sampled-token loss skips it
        )


def _reference(p: Prompt, tok: Any) -> Fixed:
    if p.answer is None:
        raise ConfigError(
            f"data.mix.source reference: train prompt {p.id!r} has no answer; give every "
            "train prompt one (data.answer_field) or use source teacher"
        )
    ids = tok(p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Fixed(ids, p.answer, True, None, None, "reference")


def _earlier_teacher_samples(spec: RunSpec, r: int) -> dict[tuple[str, int], Fixed]:
    """The teacher's samples that rounds before ``r`` mixed in, by (prompt id, sample index):
    the cache of a fixed source that does not change between rounds."""
    out: dict[tuple[str, int], Fixed] = {}
    for earlier in range(1, r):
        if not spec.store.has_stage(spec.run_id, earlier, "generate"):
            continue
        t = spec.store.read_stage(spec.run_id, earlier, "generate", "samples")
        if "source" not in t.column_names:
            continue
        t = t.filter(pc.equal(t.column("source"), "teacher"))
        for x in t.to_pylist():
            out[(x["prompt_id"], x["sample_idx"])] = Fixed(
                x["response_token_ids"],
                x["response"],
                x["finished"],
                x["sample_logprob_sum"],
                x["seed"],
                x["generator_checkpoint"],
            )
    return out
