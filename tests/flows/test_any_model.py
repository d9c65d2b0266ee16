"""`npd run` on a decoder-only family other than the toy's Qwen2, as the docs' worked example
"without a download" runs it: ``examples/chat_gsm8k.py`` writes tiny random Llama teacher and
student (a chat template with a system turn), a conversational Parquet train set, a
``save_to_disk`` eval set and a JSONL one, and the config (``eval.metric: gsm8k``, two
``eval.sets``) that the docs print."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from chat_models import EXAMPLE, example
from resume_checks import NPD, npd_env
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from npd_core.store import query

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "docs" / "data-and-eval.md"
SECTION = "### Without a download"  # the worked example's random-weights twin
ROUNDS = 2  # the example config's


def _readme_block(after: str, lang: str) -> str:
    """The first ``lang`` code block of docs/data-and-eval.md after the line ``after``."""
    text = README.read_text()
    text = text[text.index(after) :]
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, prefect_api):
    """The worked example's commands, as the docs give them, in a fresh folder."""
    d = tmp_path_factory.mktemp("example")
    commands = _readme_block(SECTION, "bash").strip().splitlines()
    write, run, status = (c.split("#")[0].split() for c in commands)
    assert write[:2] == [".venv/bin/python", "examples/chat_gsm8k.py"]
    assert run[:2] == [".venv/bin/npd", "run"] and status[:2] == [".venv/bin/npd", "status"]
    made = subprocess.run(
        [sys.executable, str(EXAMPLE), *write[2:]], cwd=d, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr[-2000:]
    env = npd_env(prefect_api, d / "prefect")

    def npd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*NPD, *args], cwd=d, env=env, capture_output=True, text=True)

    res = npd("run", *run[2:], "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    shown = npd("status", *status[2:])
    assert shown.returncode == 0, shown.stderr[-2000:]
    shown_json = npd("status", *status[2:], "--json")
    assert shown_json.returncode == 0, shown_json.stderr[-2000:]
    out = d / run[run.index("--out") + 1]
    return json.loads(res.stdout), out, d / write[2], shown.stdout, json.loads(shown_json.stdout)


def test_the_readme_prints_the_config_the_example_writes(llama_run):
    _, _, example_dir, *_ = llama_run
    assert _readme_block(SECTION, "yaml") == example.CONFIG
    assert (example_dir / "my.yaml").read_text() == example.CONFIG


def test_the_run_completes_on_llama_with_gsm8k_on_both_sets(llama_run):
    summary, out, *_ = llama_run
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    rows = query(
        out / "npd.duckdb", "SELECT round, eval_set, metric, score, n FROM evals ORDER BY ALL"
    ).to_pylist()
    assert [(r["round"], r["eval_set"], r["n"]) for r in rows] == [
        (k, name, n) for k in range(ROUNDS + 1) for name, n in (("gsm8k", 16), ("hard", 8))
    ]
    assert all(r["metric"] == "gsm8k" and 0 <= r["score"] <= 100 for r in rows)
    runs = query(out / "npd.duckdb", "SELECT status FROM runs").to_pylist()
    assert runs == [{"status": "completed"}]


def test_every_sample_keeps_the_templated_prompt_it_was_tokenised_from(llama_run):
    """The chat template rendered the system turn and the generation prompt; the stored ids are
    that text's tokens; the assistant's worked answer is not part of the prompt."""
    _, out, example_dir, *_ = llama_run
    tok = AutoTokenizer.from_pretrained(example_dir / "student")
    rows = query(out / "npd.duckdb", "SELECT prompt, prompt_token_ids FROM samples").to_pylist()
    assert len(rows) == 32 * ROUNDS
    for r in rows:
        assert r["prompt"].startswith(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"{example.SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        )
        assert r["prompt"].endswith("?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert r["prompt"].count("assistant") == 1 and " = " not in r["prompt"]  # no answer
        assert tok(r["prompt"], add_special_tokens=False)["input_ids"] == r["prompt_token_ids"]


def test_the_run_keeps_its_own_copies_of_the_sets(llama_run):
    """Every set is frozen into the run as npd JSONL (hard.jsonl too: the config's prompt field
    is not the default); the prompts table holds the conversations (as JSON) and the references
    (a train conversation's last turn)."""
    _, out, *_ = llama_run
    (run_dir,) = (out / "runs").iterdir()
    assert sorted(p.name for p in (run_dir / "run").glob("*.jsonl")) == [
        "eval_prompts-hard.jsonl",
        "eval_prompts.jsonl",
        "train_prompts.jsonl",
    ]
    rows = query(
        out / "npd.duckdb", "SELECT split, eval_set, prompt_id, prompt, answer FROM prompts"
    ).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 64 and all("\n#### " in r["answer"] for r in train)
    assert [t["role"] for t in json.loads(train[0]["prompt"])] == ["system", "user"]
    held = sorted((r["eval_set"], r["prompt_id"]) for r in rows if r["split"] == "eval")
    want = [("gsm8k", f"gsm-{i}") for i in range(16)] + [("hard", f"hard-{i}") for i in range(8)]
    assert held == sorted(want)
    hard = next(r for r in rows if r["prompt_id"] == "hard-0")
    assert hard["answer"] == "#### 38,852" and json.loads(hard["prompt"])[0]["role"] == "system"


def test_npd_status_shows_each_sets_score_every_round(llama_run):
    """`npd status` has a score column per eval set, the primary one (gsm8k, the first of
    eval.sets) starred and first; every round's row holds the scores the evals table stored
    for both sets, as `npd status --json` gives them."""
    _, out, _, shown, shown_json = llama_run
    evals = query(out / "npd.duckdb", "SELECT round, eval_set, score FROM evals").to_pylist()
    stored = {(e["round"], e["eval_set"]): e["score"] for e in evals}
    (run,) = shown_json
    assert {x["round"] for x in run["rounds"]} >= set(range(1, ROUNDS + 1))
    for x in run["rounds"]:
        assert x["scores"] == {n: stored[x["round"], n] for n in ("gsm8k", "hard")}
    cells = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in shown.splitlines()]
    header = next(c for c in cells if c and c[0] == "round")
    assert header[1:3] == ["gsm8k*", "hard"]
    body = {c[0]: c[1:3] for c in cells if c and c[0].isdigit()}
    assert body == {
        str(x["round"]): [f"{x['scores'][n]:.1f}" for n in ("gsm8k", "hard")] for x in run["rounds"]
    }


def test_checkpoints_are_llama_and_load_with_plain_transformers(llama_run):
    _, out, *_ = llama_run
    (run_dir,) = (out / "runs").iterdir()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / f"round={ROUNDS}")
    assert isinstance(model, LlamaForCausalLM)
    tok = AutoTokenizer.from_pretrained(run_dir / "checkpoints" / f"round={ROUNDS}")
    assert tok.chat_template == example.TEMPLATE  # the template travels with every checkpoint
