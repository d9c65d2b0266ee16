"""Resolving a run: a frozen prompt set is npd's own JSONL beside the run's spec, read back as
written (turns included) with no temp file left; run ids sort by when they were made."""

from __future__ import annotations

from npd_core.data import Prompt, read_prompts
from npd_core.pipeline.resolve import freeze, new_run_id


def test_a_frozen_set_reads_back_as_written_beside_the_spec(tmp_path):
    prompts = [
        Prompt("a", "3 1 2", "1 2 3"),
        Prompt("b", ({"role": "user", "content": "hi"},), None),
    ]
    path = freeze(prompts, tmp_path, "run1", "train_prompts")
    assert path == tmp_path / "runs" / "run1" / "run" / "train_prompts.jsonl"
    assert [(p.id, p.answer) for p in read_prompts(path)] == [("a", "1 2 3"), ("b", None)]
    assert read_prompts(path)[0].prompt == "3 1 2"
    assert sorted(x.name for x in path.parent.iterdir()) == ["train_prompts.jsonl"]


def test_run_ids_are_distinct_and_start_with_the_time():
    a, b = new_run_id(), new_run_id()
    assert a != b and a[:8].isdigit() and a[8] == "-" and len(a) == len("20260101-120000-abcdef")
