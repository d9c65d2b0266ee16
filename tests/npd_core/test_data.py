"""Prompt sets: every form a user keeps them in reads to the same prompts, and every malformed
input is one error naming the file, the line or row, and the field (the CLI-level cases, one per
kind of bad data, are in tests/flows/test_bad_input.py)."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from npd_core.config import DataConfig, build_config
from npd_core.data import Prompt, read_prompts, reads_as_is, shared_prompts, write_prompts
from npd_core.errors import DataError

SYSTEM = {"role": "system", "content": "You are a careful math tutor."}
ROWS = [  # TRL's conversational format: a system turn, the question, the reference answer
    {
        "id": "q1",
        "messages": [
            SYSTEM,
            {"role": "user", "content": "What is 1,000 + 234?"},
            {"role": "assistant", "content": "1,000 + 234 = 1,234\n#### 1,234"},
        ],
        "answer": None,  # a null answer: the trailing assistant turn is the reference
    },
    {"id": "q2", "messages": [{"role": "user", "content": "What is 6 * 7?"}], "answer": "42"},
]
WANT = [
    Prompt(
        "q1",
        (SYSTEM, {"role": "user", "content": "What is 1,000 + 234?"}),
        "1,000 + 234 = 1,234\n#### 1,234",
    ),
    Prompt("q2", ({"role": "user", "content": "What is 6 * 7?"},), "42"),
]


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    datasets.disable_progress_bars()


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
        (b'{"prompt": "a", "answer": [5]}\n', ":1: 'answer' must be a string or a number"),
        (b'{"prompt": "a", "id": true}\n', ":1: 'id' must be a string or integer"),
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
    p.write_text('{"prompt": "x", "answer": "y"}\n\n{"id": "b", "prompt": "z", "answer": 7}\n')
    got = read_prompts(p)
    assert [(q.id, q.prompt, q.answer) for q in got] == [("ok-1", "x", "y"), ("b", "z", "7")]


def test_prompt_glob_reads_files_in_sorted_order_with_unique_ids(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "b1"}\n{"id": "x", "prompt": "b2"}\n')
    (tmp_path / "a.jsonl").write_text('{"prompt": "a1"}\n')
    (tmp_path / "notes.txt").write_text("not a prompt file")
    got = read_prompts(tmp_path / "*.jsonl")
    assert [(p.id, p.prompt) for p in got] == [("a-1", "a1"), ("b-1", "b1"), ("x", "b2")]
    (tmp_path / "c.jsonl").write_text('{"id": "x", "prompt": "c1"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: duplicate id 'x' \(also at .*b.jsonl:2\)"):
        read_prompts(tmp_path / "*.jsonl")
    with pytest.raises(DataError, match="no file matches"):
        read_prompts(tmp_path / "none-*.jsonl")


def test_every_form_of_a_conversational_set_reads_the_same_prompts(tmp_path):
    """JSONL, a Parquet file, a folder of Parquet shards, a glob of them, a save_to_disk Dataset
    and a DatasetDict split: each gives the same prompts. The trailing assistant turn is the
    answer where the row has none, and the system turn stays in the prompt."""
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "set.parquet")
    shards = tmp_path / "shards" / "data"
    shards.mkdir(parents=True)
    pq.write_table(table.slice(0, 1), shards / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(1), shards / "train-00001-of-00002.parquet")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    for source in ("set.jsonl", "set.parquet", "shards", "shards/data/*.parquet", "saved"):
        assert read_prompts(tmp_path / source) == WANT, source
    assert read_prompts(tmp_path / "dd", split="train") == WANT
    assert read_prompts(tmp_path / "dd" / "test") == WANT[1:]
    with pytest.raises(DataError, match=r"splits train, test and no data.split is set"):
        read_prompts(tmp_path / "dd")


def test_field_mapping_and_plain_strings(tmp_path):
    """``data.*_field`` names the columns; a numeric answer column reads as text; a plain
    string prompt stays a string."""
    rows = [{"question": "What is 2 + 2?", "solution": 4, "uid": 7}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm.parquet")
    got = read_prompts(
        tmp_path / "gsm.parquet", prompt_field="question", answer_field="solution", id_field="uid"
    )
    assert got == [Prompt("7", "What is 2 + 2?", "4")]
    with pytest.raises(DataError, match=r"gsm.parquet: no column 'prompt' or 'messages' \(col"):
        read_prompts(tmp_path / "gsm.parquet")
    unmapped = read_prompts(tmp_path / "gsm.parquet", prompt_field="question")
    assert unmapped == [Prompt("gsm-0", "What is 2 + 2?", None)]  # id and answer optional


def test_npd_jsonl_round_trips_and_is_read_as_is(tmp_path):
    """A set written by ``write_prompts`` (the run's frozen copy) reads back with the default
    options to the same prompts; only such a file is used without a copy."""
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "set.parquet")
    write_prompts(tmp_path / "frozen.jsonl", read_prompts(tmp_path / "set.parquet"))
    assert read_prompts(tmp_path / "frozen.jsonl") == WANT
    assert reads_as_is(tmp_path / "frozen.jsonl", DataConfig())
    assert not reads_as_is(tmp_path / "frozen.jsonl", DataConfig(prompt_field="question"))
    assert not reads_as_is(tmp_path / "set.parquet", DataConfig())
    assert not reads_as_is(tmp_path / "*.jsonl", DataConfig())


def test_hub_names_and_urls_are_refused_with_the_way_to_save_them_locally(tmp_path):
    """npd never downloads: a hub name that is no local path, or a URL, is one error saying to
    save the dataset locally first; the config keeps such values as written."""
    cfg = build_config(
        {"data": {"prompts": "openai/gsm8k", "eval_prompts": "https://x.org/t.parquet"}},
        base=tmp_path,
    )
    assert (cfg.data.prompts, cfg.data.eval_prompts) == ("openai/gsm8k", "https://x.org/t.parquet")
    with pytest.raises(DataError, match=r"openai/gsm8k: .*never downloads.*save_to_disk\(DIR\)"):
        read_prompts(cfg.data.prompts)
    with pytest.raises(DataError, match=r"https://x.org/t.parquet: .*never downloads"):
        read_prompts(cfg.data.eval_prompts)
    (tmp_path / "openai" / "gsm8k").mkdir(parents=True)  # a local folder of that name
    local = build_config({"data": {"prompts": "openai/gsm8k"}}, base=tmp_path).data.prompts
    assert local == str(tmp_path / "openai" / "gsm8k")


def test_shared_prompts_compare_exact_text():
    train = [Prompt("a", "What is 1 + 1?"), WANT[1]]
    held = [
        Prompt("x", "What is 1 + 1?"),
        Prompt("y", "what is 1 + 1?"),
        Prompt("z", WANT[1].prompt),
    ]
    assert shared_prompts(train, held) == ["x", "z"]
