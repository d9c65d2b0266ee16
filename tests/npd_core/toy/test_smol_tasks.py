"""The smol world's questions and grading, without its models: each task's answers are right,
the mix's shares of train, held-out and warm-up prompts come out as set and no question is in two
sets, and ``ANSWER_REGEX`` grades sentences as SmolLM2-135M-Instruct writes them as a reader
would."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from npd_core.method.evaluate import exact_match
from npd_core.modelio import file_digest
from npd_core.toy.smol import (
    ANSWER_REGEX,
    SECOND,
    TASKS,
    SmolSpec,
    make_prompts,
    task_of,
    warm_prompts,
)

OPTIONAL = ("common_words", "warm_disjoint", "rephrase")  # out of the digest when None
# the first specs' sets (the 10-layer spec, digest smol-40cd5fac163d): held-out items of their own
FIRST = SmolSpec(
    n_train=1000,
    n_warm=400,
    mix=(("first_letter", 0.55), ("successor", 0.4), ("addition", 0.05)),
    warm_disjoint=None,
    rephrase=None,
)
WORDS = ["".join(w) for w in itertools.product("pencilarbo", repeat=5)][:3000]


def test_each_task_answers_its_questions():
    for q, a in TASKS["successor"](WORDS):
        n = int(re.fullmatch(r"What is (\d+) \+ 1\? Reply with only the number\.", q).group(1))
        assert int(a) == n + 1
    sums = TASKS["addition"](WORDS)
    assert len(sums) == 100 and len({q for q, _ in sums}) == 100
    for q, a in sums:
        x, y = map(int, re.fullmatch(r"What is (\d) \+ (\d)\? Reply.*", q).groups())
        assert int(a) == x + y
    assert TASKS["first_letter"](["pencil"]) == [
        ('What is the first letter of the word "pencil"?', "P")
    ]


def test_the_mix_draws_disjoint_sets_in_its_shares():
    """The first specs' mix: 55% first letters, 40% successors, 5% sums of 1,000 train, 600
    held-out and 400 warm-up prompts; all 100 sums used once, no question in two sets."""
    spec = FIRST
    sets = make_prompts(spec, WORDS)
    assert [len(s) for s in sets] == [1000, 600, 400]
    counts = [Counter(p.id.split("-")[0] for p in s) for s in sets]
    assert counts == [
        {"first_letter": 550, "successor": 400, "addition": 50},
        {"first_letter": 330, "successor": 240, "addition": 30},
        {"first_letter": 220, "successor": 160, "addition": 20},
    ]
    questions = [p.prompt for s in sets for p in s]
    assert len(set(questions)) == len(questions) == 2000
    assert len({p.id for s in sets for p in s}) == 2000
    assert make_prompts(spec, WORDS) == sets  # seeded


def test_a_disjoint_warm_up_leaves_the_train_prompts_untaught():
    """``warm_disjoint``: the warm-up trains on its own prompts alone; the next spec's 700 train
    and 700 warm-up prompts fit the tasks' questions; unset, it keeps the first specs' digest."""
    spec = replace(FIRST, n_train=700, n_warm=700, warm_disjoint=True)
    train, held, warm = make_prompts(spec, WORDS)
    assert [len(s) for s in (train, held, warm)] == [700, 600, 700]
    assert warm_prompts(spec, train, warm) == warm
    assert not {p.prompt for p in warm} & {p.prompt for p in train + held}
    assert warm_prompts(FIRST, train, warm) == train + warm
    gguf = Path(__file__)  # any file: the digest hashes it beside the spec's fields
    before = {k: v for k, v in asdict(FIRST).items() if k not in OPTIONAL}  # the 10-layer spec
    text = json.dumps(before, sort_keys=True) + file_digest(gguf)
    assert FIRST.digest(gguf) == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert spec.digest(gguf) != replace(spec, warm_disjoint=None).digest(gguf)


def test_rephrase_asks_the_held_out_set_about_the_train_items_in_other_words():
    """``rephrase``: held-out prompt i asks about train prompt i's item (same answer, same task,
    the task's second phrasing), no question in two sets, and the warm-up's items are its own;
    without a disjoint warm-up (which would teach the held-out items) it is refused."""
    mix = (("first_letter", 0.95), ("addition", 0.05))  # the successor has no second phrasing
    spec = SmolSpec(600, 600, 1400, mix)
    train, held, warm = make_prompts(spec, WORDS)
    assert [len(s) for s in (train, held, warm)] == [600, 600, 1400]
    for t, h in zip(train, held, strict=True):
        assert (task_of(h), h.answer) == (task_of(t), t.answer) and h.prompt != t.prompt
        assert h.id == t.id.replace("-0-", "-1-")
    asked = {
        name: dict(zip(TASKS[name](WORDS, SECOND[name]), TASKS[name](WORDS), strict=True))
        for name in SECOND
    }
    assert all(
        asked[task_of(h)][(h.prompt, h.answer)][0] == t.prompt
        for t, h in zip(train, held, strict=True)
    )
    questions = [p.prompt for s in (train, held, warm) for p in s]
    assert (
        len(set(questions)) == len(questions) and len({p.id for p in train + held + warm}) == 2600
    )
    assert warm_prompts(spec, train, warm) == warm
    assert Counter(task_of(p) for p in warm)["addition"] == 70  # with the train's 30: all 100 sums
    with pytest.raises(ValueError, match="rephrase needs warm_disjoint"):
        make_prompts(replace(spec, warm_disjoint=None), WORDS)


def test_rephrase_holds_out_a_task_without_a_second_phrasing_on_items_of_its_own():
    """The current spec (the mixed one, gated): first letters held out as the train words asked
    again, successors (no second phrasing) as numbers no other set asks about: 240 + 240 + 500
    of its 989, so the warm-up takes 1,250 prompts, not 1,400; too few left to hold out is
    refused."""
    mix = (("first_letter", 0.6), ("successor", 0.4))
    spec = SmolSpec()
    assert spec == SmolSpec(600, 600, 1250, mix, warm_disjoint=True, rephrase=True)
    train, held, warm = make_prompts(spec, WORDS)
    assert "successor" not in SECOND and len(held) == 600
    for t, h in zip(train, held, strict=True):
        assert task_of(h) == task_of(t) and h.prompt != t.prompt
        if task_of(h) == "successor":
            n = int(re.match(r"What is (\d+) \+ 1", h.prompt).group(1))
            assert int(h.answer) == n + 1
    succ = [{p.prompt for p in s if task_of(p) == "successor"} for s in (train, held, warm)]
    assert [len(x) for x in succ] == [240, 240, 500] and not (succ[1] & (succ[0] | succ[2]))
    assert {p.answer for p in held if task_of(p) == "first_letter"} <= set("PENCILARBO")
    with pytest.raises(ValueError, match="task successor has too few questions to hold out"):
        make_prompts(replace(spec, n_warm=1400), WORDS)  # 240 + 560 leave 189 of 989


def test_a_share_larger_than_its_task_is_refused():
    spec = SmolSpec(mix=(("first_letter", 0.5), ("addition", 0.5)))
    with pytest.raises(ValueError, match="task addition has too few questions"):
        make_prompts(spec, WORDS)


@pytest.mark.parametrize(
    ("response", "answer", "right"),
    [
        ('The first letter of the word "pencil" is "P".', "P", True),
        ('The first letter of the word "apple" is "A".', "A", True),
        ("The number 2301 is a decimal number with a base of 10.", "A", False),  # "is a"
        ("592 + 1 = 593", "593", True),
        ("592 + 1 equals 593.", "593", True),
        ("792 + 1 = 803", "793", False),
        ("The answer is 0.", "8", False),  # What is 0 + 8?
        ("The number that comes after 509 is 509 itself.", "510", False),  # echoed
        ("7 + 7 = 12, which is the sum of 7 itself.", "14", False),  # the first answer counts
        ("To add 592 + 1, you simply add 1 to 592.", "593", False),  # no answer given
    ],
)
def test_the_answer_pattern_grades_the_teachers_sentences(response, answer, right):
    assert exact_match([response], [answer], "regex", ANSWER_REGEX).score == 100.0 * right


class _Pieces:
    """A stand-in tokenizer whose token ids are the text pieces themselves."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ids)


def test_the_smol_gate_cuts_a_sample_before_its_answer():
    """Gate M3 on the smol world hands the teacher a prefix of θ₀'s sample that stops before
    the answer the pattern reads; a sample with no answer is cut anywhere but its end."""
    import random

    from npd_core.toy.gates import answer_cut

    rng = random.Random(0)
    said = ["The", " first", " letter", " is", ' "', "P", '".']
    cuts = {answer_cut(_Pieces(), said, rng) for _ in range(200)}
    assert cuts == {1, 2, 3, 4, 5}  # "P" is the sixth token: no prefix holds it
    babble = ["sa", "bams", " err", "ant"]
    assert {answer_cut(_Pieces(), babble, rng) for _ in range(200)} == {1, 2, 3}
    assert answer_cut(_Pieces(), ["7"], rng) == 1


def test_the_smol_gate_splits_m3_by_task():
    """M3's per-task rows: each task's share of hits from the prompt and after the cut."""
    from npd_core.data import Prompt
    from npd_core.toy.gates import _by_task

    held = [
        Prompt(f"{t}-1-{i}", "q", "a")
        for i, t in enumerate(["first_letter"] * 4 + ["addition"] * 2)
    ]
    rows = _by_task(held, [1, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 0])
    assert rows["first_letter"] == {
        "samples": 4,
        "teacher_from_prompt": 75.0,
        "teacher_off_path": 25.0,
        "drop": 50.0,
    }
    assert rows["addition"]["drop"] == 0.0 and rows["addition"]["teacher_from_prompt"] == 50.0


def test_first_letters_can_be_limited_to_the_most_common_words():
    """``common_words``: K words from the front of the list (the lowest token ids)."""
    spec = replace(FIRST, mix=(("first_letter", 0.95), ("addition", 0.05)), common_words=2000)
    sets = make_prompts(spec, WORDS)
    asked = {
        re.search(r'"(\w+)"', p.prompt).group(1) for s in sets for p in s if "letter" in p.prompt
    }
    assert len(asked) == 1900 and asked <= set(WORDS[:2000])
    with pytest.raises(ValueError, match="task first_letter has too few questions"):
        make_prompts(replace(spec, common_words=1000), WORDS)


def test_the_worlds_sampling_temperature_reaches_runs_and_stays_out_of_the_digest(
    tmp_path, monkeypatch
):
    """``SmolSpec.temperature`` changes no built model, so a new one keeps the cached world;
    a run's config takes it as ``generate.temperature`` (and the world's loss as
    ``train.loss``) unless the config sets its own."""
    from npd_core.config import NPDConfig
    from npd_core.pipeline.resolve import apply_world_defaults

    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"GGUF weights")
    before = SmolSpec().digest(gguf)
    monkeypatch.setattr(SmolSpec, "temperature", 0.5)
    assert SmolSpec().digest(gguf) == before
    cfg = NPDConfig()
    apply_world_defaults(cfg, SmolSpec().config_defaults())
    assert cfg.generate.temperature == 0.5 and cfg.generate.max_new_tokens == 24
    assert cfg.train.loss == SmolSpec.loss == "ce"  # the world's loss, by its demos' rule
    own = NPDConfig.model_validate({"generate": {"temperature": 0.9}})
    apply_world_defaults(own, SmolSpec().config_defaults())
    assert own.generate.temperature == 0.9
