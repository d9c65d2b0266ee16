"""The views world: its eight views and their tokens, the per-line metric, the arithmetic of the
gate checks on hand-made numbers, the world's sizes, the toy and long worlds' prompts unchanged by
the shared prompt drawer, and the build's progress (a tiny spec: nothing here trains for long)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from transformers import AutoTokenizer, Qwen2Config

from npd_core.config import NPDConfig
from npd_core.data import Prompt
from npd_core.method.evaluate import exact_match
from npd_core.pipeline.spec import RunSpec
from npd_core.pipeline.stages import evaluate_stage
from npd_core.store import Store, query
from npd_core.toy import gates, views_task
from npd_core.toy import world as world_module
from npd_core.toy.world import LongSpec, ModelSpec, ToySpec, ViewsSpec, build_toy_world

ANSWER = "\n".join(
    [
        "A ab ab dc ej",
        "D ej dc ab ab",
        "U ab dc ej",
        "W ej dc ab",
        "R ab ej ab dc",
        "S ab ab dc ej",
        "L ab ab dc",
        "H ej dc ab",
    ]
)


def test_eight_views_of_a_hand_made_list():
    assert views_task.solve("sort dc ab ej ab =") == ANSWER
    # by second letter, ties by the first: cb (b, c), ea (a, e), ab (b, a) → ea, ab, cb
    assert views_task.solve("sort cb ea ab =").split("\n")[5] == "S ea ab cb"


def test_views_hold_on_many_lists():
    for ex in views_task.make_examples(300, seed=4, min_len=5, max_len=8):
        ws = views_task.prompt_words(ex["prompt"])
        got = {line[0]: line.split()[1:] for line in ex["answer"].split("\n")}
        assert list(got) == list("ADUWRSLH")
        assert got["A"] == sorted(ws) and got["D"] == sorted(ws)[::-1]
        assert got["U"] == sorted(set(ws)) and got["W"] == sorted(set(ws))[::-1]
        assert got["R"] == ws[::-1] and got["L"] == sorted(ws)[:3]
        assert got["H"] == sorted(ws)[::-1][:3]
        assert sorted(got["S"]) == sorted(ws)
        assert [(w[1], w[0]) for w in got["S"]] == sorted((w[1], w[0]) for w in ws)


def test_one_token_per_marker_word_and_newline(tmp_path):
    ours = views_task.build_tokenizer()
    ours.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(ours)).save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    lengths = []
    for ex in views_task.make_examples(100, seed=3, min_len=5, max_len=8):
        text = views_task.response_text(ex["answer"])
        ids = ours(text)["input_ids"]
        assert theirs(ex["prompt"] + text)["input_ids"] == ours(ex["prompt"] + text)["input_ids"]
        assert len(ids) + 1 == views_task.answer_tokens(ex["prompt"])  # + EOS
        assert ours.decode(ids) == text
        lengths.append(len(ids) + 1)
    assert min(lengths) >= 44 and max(lengths) <= 70


def test_lines_metric_gives_credit_per_line_in_place():
    lines = ANSWER.split("\n")
    one_wrong = "\n".join(lines[:3] + ["W ej ab dc"] + lines[4:])
    shifted = "\n".join(lines[1:])  # every line one place early
    half = "\n".join(lines[:4])  # stopped after four lines
    spaced = "\n".join("  " + x.replace(" ", "  ") + " " for x in lines) + "\n"
    extra = ANSWER + "\nX ab"
    texts = [ANSWER, one_wrong, shifted, half, spaced, extra]
    res = exact_match(texts, [ANSWER] * len(texts), "lines")
    assert res.correct.tolist() == [1.0, 0.875, 0.0, 0.5, 1.0, 1.0]
    assert res.metric == "lines" and abs(res.score - 100 * 4.375 / 6) < 1e-9
    whole = exact_match(texts, [ANSWER] * len(texts))  # beside it: all lines exact
    assert whole.correct.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_the_gates_grade_lines_in_place():
    g = gates.grade([ANSWER, "A ab ab dc ej\nD x"], [ANSWER, ANSWER])
    assert g.lines == 100 * (1 + 1 / 8) / 2 and g.exact == 50.0
    assert g.line_hits[1] == [True] + [False] * 7


@dataclass
class Gen:
    token_ids: list[int]
    finished: bool


def test_m4_arithmetic():
    gens = [Gen([1] * 60, True)] * 9 + [Gen([1] * 90, False)]
    res = gates.length_check(gens, [60] * 10)
    assert res["finished"] == 0.9 and res["mean_sample_tokens"] == 63.0
    assert res["length_error"] == 0.05 and res["pass"]
    assert not gates.length_check(gens, [50] * 10)["pass"]  # 26% long


def test_m3_cuts_after_a_complete_line_and_pools_the_rest():
    nl = 9
    gens = [Gen([1, nl, 2, nl, 3, nl, 4], True), Gen([5, 6], False)]
    cuts = gates.cut_points(gens, nl, n_lines=8, seed=0)
    assert cuts[1] is None  # no complete line to keep
    assert cuts[0] in (2, 4, 6) and gens[0].token_ids[cuts[0] - 1] == nl
    seen = {gates.cut_points([gens[0]], nl, 8, seed=s)[0] for s in range(50)}
    assert seen == {2, 4, 6}
    own = [[True] * 8, [True] * 8]
    cont = [[False] * 2 + [True] * 6, [False] * 4 + [True, True, False, False]]
    res = gates.off_path(own, cont, kept_lines=[2, 4])  # 6 + 4 remaining lines, 8 right
    assert res["remaining_lines"] == 10 and res["teacher_off_path"] == 80.0
    assert res["drop"] == 20.0 and not res["pass"]


def test_m2_plateau_arithmetic():
    curve = [{"step": s, "lines": v} for s, v in [(0, 1.0), (250, 30.0), (750, 44.0), (1000, 45.0)]]
    res = gates.sft_plateau(curve, teacher=93.0, student=46.0)
    assert res["checks"] == {"teacher": True, "sft_gain": True, "gap": True, "flat": True}
    assert res["student_gain_last_quarter"] == 1.0
    rising = curve[:-1] + [{"step": 1000, "lines": 50.0}]  # +6 in the last quarter
    assert gates.sft_plateau(rising, 93.0, 50.0)["checks"]["flat"] is False
    assert gates.sft_plateau(curve, 89.0, 46.0)["checks"]["teacher"] is False
    assert gates.sft_plateau(curve, 93.0, 80.0)["checks"]["gap"] is False


def test_views_world_sizes_its_config():
    spec = ViewsSpec()
    assert spec.max_new_tokens == 91  # 1.3 × the longest answer, 70 tokens with its EOS
    assert spec.config_defaults()["eval"] == {"metric": "lines", "also": ["exact"]}
    assert spec.n_eval >= 1000 and spec.prefix == "views"
    assert gates.onpolicy_batches(spec, 8.5, 60.0) == [round(8 * 512 / 68.5), 30]
    assert spec.config_defaults()["train"] == {"lr": 3e-4, "rows_per_step": 8, "loss": "reverse_kl"}
    assert len({ToySpec().digest(), LongSpec().digest(), spec.digest()}) == 3


def test_toy_and_long_prompts_are_unchanged():
    """Worlds are cached by their spec's digest: the shared drawer must keep every id, prompt
    and answer of the worlds built before it (hashes of their first 3,000 examples)."""
    for spec, want in ((ToySpec(), "706dd30b4af2ced0"), (LongSpec(), "b7f39fe18512a03e")):
        got = hashlib.sha256(json.dumps(spec.examples(3000)).encode()).hexdigest()[:16]
        assert got == want
    assert ToySpec().digest() == "b4672bb11ca4" and LongSpec().digest() == "2b78d8bffa02"
    # a field added later (student_fit) keys the digest only when set, so the views world
    # built before it keeps its cache
    assert ViewsSpec().digest() == "be1413dd0031"
    before = ["student_fit=0", "student.hidden=24", "student.intermediate=48"]
    assert gates.with_fields(ViewsSpec(), [*before, "student.train_steps=8000"]).digest() == (
        "b21a59189e71"
    )


TINY = ViewsSpec(
    n_train=8,
    n_eval=4,
    n_fit=16,
    teacher=ModelSpec(64, 1, 1, 64, 3, 3e-3),
    student=ModelSpec(64, 1, 1, 64, 2, 3e-3),
    rows_per_step=2,
    max_seq_len=128,
)


def test_build_reports_progress_and_curves_leave_it_unchanged(tmp_path):
    bars: dict[str, list[int]] = {}

    def progress(description: str, total: int):
        bars[description] = [0, total]
        return lambda n: bars[description].__setitem__(0, bars[description][0] + n)

    plain = build_toy_world(
        tmp_path / "a", TINY, log=lambda m: None, progress=progress, parallel=True
    )
    assert plain.root.name == f"views-{TINY.digest()}"
    assert bars == {
        "views teacher: training": [3, 3],
        "views teacher: scoring": [4, 4],
        "views student: training": [2, 2],
        "views student: scoring": [4, 4],
    }
    curves = tmp_path / "curves.jsonl"  # a killed build's points and torn last line: replaced
    curves.write_text('{"model": "teacher", "step": 0, "s": 9}\n{"model": "student", "st')
    train = [Prompt(e["id"], e["prompt"], e["answer"]) for e in TINY.examples(TINY.n_train)]
    watch = gates.watch_curves(TINY, curves, train, 0.0)
    watched = build_toy_world(tmp_path / "b", TINY, log=lambda m: None, watch=watch)
    for name in ("teacher", "student"):
        a = (plain.root / name / "model.safetensors").read_bytes()
        assert (watched.root / name / "model.safetensors").read_bytes() == a
    points = [json.loads(x) for x in curves.read_text().splitlines()]  # the two interleave
    assert sorted((p["model"], p["step"]) for p in points) == [
        ("student", 0),
        ("student", 2),
        ("teacher", 0),
        ("teacher", 3),
    ]
    one_by_one = build_toy_world(tmp_path / "c", TINY, log=lambda m: None, parallel=False)
    for name in ("teacher", "student"):  # side by side, the same weights as one after the other
        a = (plain.root / name / "model.safetensors").read_bytes()
        assert (one_by_one.root / name / "model.safetensors").read_bytes() == a
    assert (
        json.loads((one_by_one.root / "world.json").read_text())["student"]["score"]
        == (plain.meta["student"]["score"])
    )


def test_evaluate_stage_reports_exact_beside_lines(tmp_path):
    """``eval.also``: the same greedy answers graded again, stored as a set of its own."""
    world = build_toy_world(tmp_path / "toy", TINY, log=lambda m: None)
    cfg = NPDConfig.model_validate(TINY.config_defaults()).model_dump(mode="json")
    store = Store(tmp_path / "out")
    row = dict(run_id="a", status="running", config_json=json.dumps(cfg), config_hash="h")
    store.write_run({**row, "created_at": datetime.now(UTC)})
    paths = (world.teacher, world.student, world.train_prompts, world.eval_prompts)
    spec = RunSpec(str(tmp_path / "out"), "a", cfg, *map(str, paths))
    res = evaluate_stage(spec, 0, {})
    rows = query(store.db_path, "SELECT eval_set, metric, score, n FROM evals").to_pylist()
    by_set = {r["eval_set"]: r for r in rows}
    assert by_set.keys() == {"heldout", "heldout.exact"}
    assert by_set["heldout"]["metric"] == "lines"
    assert by_set["heldout.exact"]["metric"] == "exact_match"
    assert by_set["heldout.exact"]["n"] == TINY.n_eval
    assert by_set["heldout.exact"]["score"] <= by_set["heldout"]["score"]
    assert res.metrics.score == by_set["heldout"]["score"]


def test_off_path_examples_keep_the_true_rest_after_wrong_lines():
    """The teacher's off-path examples: a cut after 1–7 lines, about 60% of those lines wrong
    by 1–3 edits of a student's kinds (other words, a wrong length, now and then a wrong
    marker), and the target the true rest."""
    import random

    from npd_core.toy.world import _samples

    answer = views_task.solve("sort dc ab ej ab cc =")
    lines = answer.split("\n")
    rng = random.Random(0)
    wrong = cuts = longer = shorter = marker = same_length = 0
    for _ in range(400):
        prefix, rest = views_task.off_path(
            "sort dc ab ej ab cc =", answer, rng, edits=3, misread_share=0.5
        )
        head = prefix.removesuffix("\n").split("\n")
        assert prefix.endswith("\n") and 1 <= len(head) <= 7
        assert rest.split("\n") == lines[len(head) :]
        for got, true in zip(head, lines, strict=False):
            g, t = got.split(), true.split()
            wrong += got != true
            longer += len(g) > len(t)
            shorter += len(g) < len(t)
            marker += g[0] != t[0]
            same_length += got != true and len(g) == len(t) and g[0] == t[0]
        cuts += len(head)
    assert 0.5 < wrong / cuts < 0.7
    # each kind of a student's wrong lines turns up, a wrong marker the least
    assert min(same_length, longer, shorter) > 4 * marker > 0
    # a misreading: the views of one list that differs from the prompt's by one word
    for _ in range(50):
        got = views_task.misread("sort dc ab ej ab cc =", rng)
        words = got[4].split()[1:][::-1]  # the R line: the list as misread
        assert got == views_task.solve("sort " + " ".join(words) + " =").split("\n")
        assert got != lines and abs(len(words) - 5) <= 1
    tok = views_task.build_tokenizer()
    prompts = [Prompt(f"p{i}", "sort dc ab ej ab cc =", answer) for i in range(200)]
    plain = _samples(tok, prompts, ViewsSpec())
    mixed = _samples(tok, prompts, ViewsSpec(), off_path=0.5)
    assert all(len(s.response_ids) == len(plain[0].response_ids) for s in plain)
    moved = [m for m, p in zip(mixed, plain, strict=True) if m.prompt_ids != p.prompt_ids]
    assert 70 < len(moved) < 130  # about half start after a cut
    for m in moved:  # the target is the answer's true last lines, EOS closing them
        assert plain[0].response_ids[-len(m.response_ids) :] == m.response_ids


def test_student_fit_limits_the_warm_start_and_reuses_the_teacher(tmp_path, monkeypatch):
    """``student_fit``: the student's warm start sees the first N fit answers; the teacher,
    whose training the field does not touch, comes from the twin already built."""
    build_toy_world(tmp_path, TINY, log=lambda m: None)
    seen: list[list[str]] = []
    real_fit = world_module.fit

    def recording_fit(model, tok, prompts, *args, **kwargs):
        seen.append([p.id for p in prompts])
        real_fit(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(world_module, "fit", recording_fit)
    logs: list[str] = []
    small = gates.with_fields(TINY, ["student_fit=5"])
    built = build_toy_world(tmp_path, small, log=logs.append)
    fit_ids = [e["id"] for e in TINY.examples(TINY.n_train + TINY.n_eval + TINY.n_fit)][12:]
    assert seen == [fit_ids[:5]]  # the student alone trained, on the first 5 fit answers
    assert built.meta["teacher"]["reused_from"] == f"views-{TINY.digest()}"
    assert any("teacher reused" in m for m in logs)


def test_with_fields_sets_a_candidate_spec():
    spec = gates.with_fields(
        TINY, ["student_fit=300", "student.hidden=32", "teacher_off_path=0.25"]
    )
    assert (spec.student_fit, spec.student.hidden, spec.teacher_off_path) == (300, 32, 0.25)
    assert spec.student.layers == TINY.student.layers and spec.digest() != TINY.digest()
    for bad in ("student_fit", "nope=1", "student.width=3"):
        with pytest.raises(SystemExit, match=r"error: --set .*FIELD=VALUE"):
            gates.with_fields(TINY, [bad])


def test_a_candidate_temperature_is_the_smol_worlds_alone(tmp_path):
    """The views world's gates sample at temperature 1 as written: ``--temperature`` stops
    before any build."""
    with pytest.raises(SystemExit, match=r"error: --temperature: only the smol world's"):
        gates.main(["--world", "views", "--out", str(tmp_path), "--temperature", "0.5"])
    assert not (tmp_path / "toy").exists()


def test_a_reused_models_curve_is_copied_once_however_often_the_build_runs(tmp_path):
    """``--build`` on a built world copies the reused teacher's curve again: it replaces the
    earlier copy instead of doubling M2's points."""
    from types import SimpleNamespace

    row = lambda model, step: json.dumps({"model": model, "step": step, "s": step})  # noqa: E731
    (tmp_path / "views-a.curves.jsonl").write_text(f"{row('teacher', 0)}\n{row('student', 0)}\n")
    curves = tmp_path / "views-b.curves.jsonl"
    curves.write_text(row("student", 5) + "\n")
    world = SimpleNamespace(meta={"teacher": {"reused_from": "views-a"}, "student": {}})
    for _ in range(2):
        gates.copy_reused_curves(world, curves)  # type: ignore[arg-type]
    assert curves.read_text().splitlines() == [row("student", 5), row("teacher", 0)]
