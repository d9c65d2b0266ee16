"""Prompt files: every malformed input is one error naming the file and the line."""

from __future__ import annotations

import pytest

from npd_core.data import read_prompt_glob, read_prompts
from npd_core.errors import DataError


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"prompt": "a"}\n{"prompt": \n', ":2: malformed JSON"),
        (b'{"prompt": "a"}\n{"id": 3}\n', ":2: missing or non-string 'prompt'"),
        (b'{"prompt": "   "}\n', ":1: empty 'prompt'"),
        (b'{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n', ":2: duplicate id '1'"),
        (b'{"prompt": "a"}\n\xff\xfe\n', ":2: not UTF-8"),
        (b"", "no prompts"),
        (b"[1, 2]\n", ":1: expected a JSON object"),
        (b'{"prompt": "a", "answer": 5}\n', ":1: 'answer' must be a string"),
    ],
)
def test_bad_prompt_files(tmp_path, content, needle):
    p = tmp_path / "prompts.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_prompts(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_file_and_valid_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_prompts(tmp_path / "nope.jsonl")
    p = tmp_path / "ok.jsonl"
    p.write_text('{"prompt": "x", "answer": "y"}\n\n{"id": "b", "prompt": "z"}\n')
    got = read_prompts(p)
    assert [(q.id, q.prompt, q.answer) for q in got] == [("ok-1", "x", "y"), ("b", "z", None)]


def test_prompt_glob_reads_files_in_sorted_order_with_unique_ids(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "b1"}\n{"id": "x", "prompt": "b2"}\n')
    (tmp_path / "a.jsonl").write_text('{"prompt": "a1"}\n')
    (tmp_path / "notes.txt").write_text("not a prompt file")
    got = read_prompt_glob(tmp_path / "*.jsonl")
    assert [(p.id, p.prompt) for p in got] == [("a-1", "a1"), ("b-1", "b1"), ("x", "b2")]
    assert read_prompt_glob(tmp_path / "a.jsonl") == read_prompts(tmp_path / "a.jsonl")
    (tmp_path / "c.jsonl").write_text('{"id": "x", "prompt": "c1"}\n')
    with pytest.raises(DataError, match=r"c.jsonl: duplicate id 'x' \(also in .*b.jsonl\)"):
        read_prompt_glob(tmp_path / "*.jsonl")
    with pytest.raises(DataError, match="no file matches"):
        read_prompt_glob(tmp_path / "none-*.jsonl")
