"""`npd run` on a decoder-only family other than the toy's Qwen2: tiny random Llama teacher and
student with a chat template that has a system turn, trained on a conversational Parquet
dataset and scored on a ``save_to_disk`` dataset with ``eval.metric: gsm8k``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from chat_models import TEMPLATE, save_llama
from resume_checks import npd, npd_env
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from npd_core.store import query

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful math tutor. End with #### and the number."
ROUNDS = 2


def _sums(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(100, 2000), rng.randrange(100, 2000)) for _ in range(n)]


def _write_data(d: Path) -> tuple[Path, Path]:
    """Train: TRL conversations (system, user, assistant answer) in Parquet. Eval: GSM8K-style
    columns (question, answer "… #### 1,234", uid) saved with ``save_to_disk``."""
    train = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b:,}\n#### {a + b:,}"},
            ]
        }
        for a, b in _sums(32, seed=0)
    ]
    pq.write_table(pa.Table.from_pylist(train), d / "train.parquet")
    held = [
        {"uid": f"add-{i}", "question": f"What is {a} + {b}?", "answer": f"#### {a + b:,}"}
        for i, (a, b) in enumerate(_sums(8, seed=1))
    ]
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(held).save_to_disk(str(d / "heldout"))
    return d / "train.parquet", d / "heldout"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, prefect_api):
    d = tmp_path_factory.mktemp("llama")
    teacher = save_llama(d / "teacher", hidden=64, layers=2, seed=1)
    student = save_llama(d / "student", hidden=32, layers=2, seed=2)
    train, held = _write_data(d)
    cfg = {
        "rounds": ROUNDS,
        "threads": 1,
        "models": {"teacher": "teacher", "student": "student"},  # relative to the config
        "data": {
            "prompts": "train.parquet",
            "eval_prompts": "heldout",
            "prompt_field": "question",  # the eval set's; train rows hold 'messages'
            "id_field": "uid",
            "prompts_per_round": 16,
        },
        "generate": {"max_new_tokens": 12},
        "train": {"steps_per_round": 2, "rows_per_step": 4},
        "pack": {"max_seq_len": 256},
        "eval": {"metric": "gsm8k", "batch_size": 16},
    }
    (d / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = d / "out"
    res = npd(
        "run",
        str(d / "run.yaml"),
        "--out",
        str(out),
        "--json",
        env=npd_env(prefect_api, d / "prefect"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout), out, teacher, student


def test_the_run_completes_on_llama_with_the_gsm8k_metric(llama_run):
    summary, out, *_ = llama_run
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    evals = query(out / "npd.duckdb", "SELECT round, metric, score, n FROM evals ORDER BY round")
    rows = evals.to_pylist()
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(r["metric"] == "gsm8k" and r["n"] == 8 and 0 <= r["score"] <= 100 for r in rows)
    runs = query(out / "npd.duckdb", "SELECT status FROM runs").to_pylist()
    assert runs == [{"status": "completed"}]


def test_every_sample_keeps_the_templated_prompt_it_was_tokenised_from(llama_run):
    """The chat template rendered the system turn and the generation prompt; the stored ids are
    that text's tokens; the assistant's answer is not part of the prompt."""
    _, out, _, student = llama_run
    tok = AutoTokenizer.from_pretrained(student)
    rows = query(
        out / "npd.duckdb", "SELECT prompt, prompt_token_ids, round FROM samples ORDER BY ALL"
    ).to_pylist()
    assert len(rows) == 16 * ROUNDS
    for r in rows:
        assert r["prompt"].startswith(
            f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is "
        )
        assert r["prompt"].endswith("?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert r["prompt"].count("assistant") == 1 and " = " not in r["prompt"]  # no answer
        assert tok(r["prompt"], add_special_tokens=False)["input_ids"] == r["prompt_token_ids"]


def test_the_run_keeps_its_own_copies_of_both_sets(llama_run):
    """Parquet and save_to_disk sets are frozen into the run as npd JSONL; the prompts table
    holds the conversations (as JSON) and the references (a conversation's last turn)."""
    _, out, *_ = llama_run
    (run_dir,) = (out / "runs").iterdir()
    assert sorted(p.name for p in (run_dir / "run").glob("*.jsonl")) == [
        "eval_prompts.jsonl",
        "train_prompts.jsonl",
    ]
    rows = query(
        out / "npd.duckdb", "SELECT split, prompt_id, prompt, answer FROM prompts ORDER BY ALL"
    ).to_pylist()
    held = [r for r in rows if r["split"] == "eval"]
    assert [r["prompt_id"] for r in held] == sorted(f"add-{i}" for i in range(8))
    assert all(r["answer"].startswith("#### ") for r in held)
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 32 and all(r["answer"].split("\n#### ")[1] for r in train)
    turns = json.loads(train[0]["prompt"])
    assert [t["role"] for t in turns] == ["system", "user"]


def test_checkpoints_are_llama_and_load_with_plain_transformers(llama_run):
    _, out, *_ = llama_run
    (run_dir,) = (out / "runs").iterdir()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / f"round={ROUNDS}")
    assert isinstance(model, LlamaForCausalLM)
    tok = AutoTokenizer.from_pretrained(run_dir / "checkpoints" / f"round={ROUNDS}")
    assert tok.chat_template == TEMPLATE  # the chat template travels with every checkpoint
