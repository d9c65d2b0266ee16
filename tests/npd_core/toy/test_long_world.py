"""The long-answer world: its selection-sort trace and final-line grading, its build and cache by
digest, the toy world's digest untouched, and ``npd demo --world long`` filling the config with
the world's defaults (a tiny spec stands in for the real one: nothing here trains for long)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer, Qwen2Config
from typer.testing import CliRunner

from flows.cli import app
from npd_core.config import load_config
from npd_core.data import read_prompts
from npd_core.method.evaluate import exact_match
from npd_core.toy import long_task
from npd_core.toy.world import LongSpec, ModelSpec, ToySpec, build_toy_world

TINY = LongSpec(
    n_train=16,
    n_eval=8,
    n_fit=32,
    teacher=ModelSpec(64, 1, 1, 64, 2, 3e-3),
    student=ModelSpec(64, 1, 1, 64, 1, 3e-3),
    min_len=3,
    max_len=4,
    rows_per_step=4,
    max_seq_len=64,
)


def test_trace_is_selection_sort_pass_by_pass():
    assert long_task.solve("sort dc ab ej ab =") == "ab dc ej ab\nab ab ej dc\nab ab dc ej"
    for ex in long_task.make_examples(100, seed=2, min_len=4, max_len=13):
        words = long_task.prompt_words(ex["prompt"])
        lines = [x.split() for x in ex["answer"].split("\n")]
        assert len(lines) == len(words) - 1
        assert lines[-1] == sorted(words)  # the final line is the sorted list
        prev = words
        for i, line in enumerate(lines):  # pass i: the smallest of prev[i:] moves to i
            assert sorted(line) == sorted(words) and line[:i] == prev[:i]
            assert line[i] == min(prev[i:])
            assert sum(a != b for a, b in zip(line, prev, strict=True)) in (0, 2)
            prev = line


def test_one_token_per_word_and_newline_as_autotokenizer_sees_it(tmp_path):
    ours = long_task.build_tokenizer()
    ours.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(ours)).save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for ex in long_task.make_examples(30, seed=3, min_len=4, max_len=13):
        text = long_task.response_text(ex["answer"])
        ids = ours(text)["input_ids"]
        assert theirs(ex["prompt"] + text)["input_ids"] == ours(ex["prompt"] + text)["input_ids"]
        n = len(long_task.prompt_words(ex["prompt"]))
        assert len(ids) + 1 == long_task.trace_tokens(n)  # + EOS
        assert ours.decode(ids) == text


def test_final_line_metric_grades_the_result_only():
    answer = long_task.solve("sort dc ab ej ab =")
    good = long_task.response_text(answer)
    wrong_middle = " ab dc ej ab\n ab ej ab dc\n  ab ab  dc ej \n"  # right result, bad pass
    wrong_end = good.replace("dc ej", "ej dc")
    res = exact_match([good, wrong_middle, wrong_end], [answer] * 3, "final_line")
    assert res.correct.tolist() == [True, True, False] and res.metric == "final_line"
    exact = exact_match([good, wrong_middle], [answer] * 2)  # default: the whole response
    assert exact.correct.tolist() == [True, False] and exact.metric == "exact_match"


def test_toy_world_digest_is_unchanged():
    assert ToySpec().digest() == "b4672bb11ca4"  # the cached toy world's directory


def test_long_world_builds_once_and_caches_by_digest(tmp_path):
    w = build_toy_world(tmp_path, TINY, log=lambda m: None)
    assert w.root.name == f"long-{TINY.digest()}"
    assert TINY.digest() != LongSpec().digest() != ToySpec().digest()
    held = read_prompts(w.eval_prompts)
    assert len(held) == TINY.n_eval and all("\n" in p.answer for p in held)
    assert w.meta["spec"]["max_len"] == TINY.max_len
    stamp = (w.root / "world.json").stat().st_mtime_ns
    again = build_toy_world(tmp_path, TINY, log=lambda m: pytest.fail("rebuilt"))
    assert again.root == w.root and (w.root / "world.json").stat().st_mtime_ns == stamp


def test_a_new_student_reuses_the_built_teacher_and_a_new_teacher_the_student(tmp_path):
    first = build_toy_world(tmp_path, TINY, log=lambda m: None)
    student = replace(TINY.student, train_steps=TINY.student.train_steps + 2)
    logs: list[str] = []
    second = build_toy_world(tmp_path, replace(TINY, student=student), log=logs.append)
    assert second.root != first.root
    assert any("teacher reused" in m for m in logs)
    assert not any("training teacher" in m for m in logs) and any(
        "training student" in m for m in logs
    )
    same = (first.teacher / "model.safetensors").read_bytes()
    assert (second.teacher / "model.safetensors").read_bytes() == same
    assert second.meta["teacher"] == first.meta["teacher"] | {"reused_from": first.root.name}
    assert second.meta["spec"]["student"]["train_steps"] == TINY.student.train_steps + 2
    other_teacher = replace(TINY.teacher, train_steps=TINY.teacher.train_steps + 1)
    logs.clear()
    third = build_toy_world(tmp_path, replace(TINY, teacher=other_teacher), log=logs.append)
    assert any("training teacher" in m for m in logs) and not any(
        "training student" in m for m in logs
    )
    assert third.meta["student"]["reused_from"] == first.root.name
    same = (first.student / "model.safetensors").read_bytes()
    assert (third.student / "model.safetensors").read_bytes() == same


def test_long_world_sizes_its_config():
    spec = LongSpec()
    longest = long_task.trace_tokens(spec.max_len) + len(f"sort {'aa ' * spec.max_len}=".split())
    assert spec.max_new_tokens >= long_task.trace_tokens(spec.max_len)
    assert spec.max_seq_len >= longest
    assert spec.config_defaults()["eval"] == {"metric": "final_line"}
    assert ToySpec().config_defaults() == {}


@pytest.fixture
def demo_spec(tmp_path, monkeypatch):
    """Run ``npd demo --world long`` up to its flow; return what the flow would get."""
    import flows.cli
    import npd_core.pipeline.resolve

    monkeypatch.setattr(
        npd_core.pipeline.resolve, "world_spec", lambda name: TINY if name == "long" else None
    )
    got: dict = {}

    def fake_flow(spec, out, show):
        got.update(spec)
        out = {"rounds": [], "run_id": spec["run_id"]}  # the run summary's JSON, no rounds
        return SimpleNamespace(rounds=[], to_json=lambda: out)

    monkeypatch.setattr(flows.cli, "run_flow", fake_flow)

    def run(*args: str):
        res = CliRunner().invoke(
            app, ["demo", "--out", str(tmp_path), "--json", *args], catch_exceptions=False
        )
        return res, got

    return run


def test_demo_world_long_takes_the_worlds_config_defaults(demo_spec, tmp_path):
    res, spec = demo_spec("--world", "long")
    assert res.exit_code == 0, res.output
    cfg = spec["config"]
    assert cfg["generate"]["max_new_tokens"] == TINY.max_new_tokens
    assert cfg["pack"]["max_seq_len"] == TINY.max_seq_len
    assert cfg["eval"]["metric"] == "final_line"
    assert f"long-{TINY.digest()}" in spec["teacher"]
    assert json.loads(res.stdout)["run_id"] == spec["run_id"]

    own = tmp_path / "own.yaml"  # a value the config sets itself wins over the world's
    own.write_text("generate: {max_new_tokens: 7}\n")
    _, spec = demo_spec("--world", "long", "--config", str(own))
    assert spec["config"]["generate"]["max_new_tokens"] == 7
    assert spec["config"]["pack"]["max_seq_len"] == TINY.max_seq_len


def test_demo_unknown_world_is_a_config_error(tmp_path):
    from npd_core.errors import ConfigError
    from npd_core.pipeline.resolve import resolve_spec

    with pytest.raises(ConfigError, match="choose from toy, long"):
        resolve_spec(load_config(None), tmp_path, "r", world="huge")


def test_bench_plan_on_the_long_world_carries_its_defaults(tmp_path, monkeypatch):
    """``npd bench --world long`` plans on the long world: its paths, and a config whose
    response cap (which sizes onpolicy's batch) and metric are the world's."""
    import npd_core.pipeline.resolve
    from flows.headline import plan_bench

    monkeypatch.setattr(npd_core.pipeline.resolve, "world_spec", lambda name: TINY)
    plan = plan_bench(
        out=tmp_path,
        config=None,
        quick=True,
        seeds=None,
        budget_s=None,
        names=None,
        peers=[],
        log=lambda m: None,
        world="long",
    )
    assert f"long-{TINY.digest()}" in plan.paths["teacher"]
    assert plan.cfg.generate.max_new_tokens == TINY.max_new_tokens
    assert plan.cfg.eval.metric == "final_line"
