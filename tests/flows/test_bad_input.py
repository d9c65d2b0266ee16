"""Every way a user can hand npd something wrong (issue 8), one parametrized test per case.

Each refused command must print exactly one ``error:`` line (the last line on stderr) naming the
file, field or line at fault, no traceback, exit non-zero (2 for usage/config errors), and leave
the output directory byte for byte and view for view as it was (``snapshot``).

Refusals run the real console entry point (``flows.cli.main``) in this process, which keeps them
fast; the run-time cases (a real run filtered empty, a NaN loss, a full disk, Ctrl-C) start
``npd`` as a subprocess and are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import datasets
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from resume_checks import NPD

from flows import cli
from npd_core.store import MARKER_NAME, SCHEMA_VERSION, VIEWS, Store, connect, table_from_rows

# ------------------------------------------------------------------------------ helpers


def snapshot(out: Path) -> dict:
    """What a refused command must not change: every file under ``out`` (size, mtime, sha256)
    and the rows of every DuckDB view."""
    files = {
        str(p.relative_to(out)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }
    views = {}
    if (out / "npd.duckdb").is_file():
        with connect(out / "npd.duckdb") as con:
            views = {v: sorted(map(repr, con.sql(f"SELECT * FROM {v}").fetchall())) for v in VIEWS}
    return {"files": files, "views": views}


def npd(capfd: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str]:
    """Run ``npd ARGS`` through the console entry point in this process: (exit code, stderr)."""
    capfd.readouterr()
    argv = sys.argv
    sys.argv = ["npd", *map(str, args)]
    cli.RUN.clear()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = argv
    return code, capfd.readouterr().err


def assert_one_error(code: int, err: str, needles: list[str], exit_code: int | None) -> str:
    """Exactly one ``error:`` line, the last one, naming every needle; no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert code == exit_code if exit_code is not None else code not in (0, 2), (code, err)
    return errors[0]


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An npd output directory with a run in it: runs, samples, a checkpoint and an MLflow db."""
    root = tmp_path_factory.mktemp("base") / "out"
    store = Store(root)
    now = datetime.now(UTC)
    store.write_run(
        dict(run_id="r1", status="completed", config_json="{}", config_hash="h", created_at=now)
    )
    sample = dict(
        run_id="r1",
        round=1,
        sample_idx=0,
        prompt="12,3=",
        response="3,12",
        prompt_token_ids=[1, 2],
        response_token_ids=[3, 4],
        generator_checkpoint="s0",
        backend="hf",
        temperature=1.0,
        top_p=1.0,
        prompt_tokens=2,
        response_tokens=2,
        finished=True,
        created_at=now,
    )
    rows = [dict(sample, prompt_id=f"p{i}") for i in range(3)]
    store.write_stage("r1", 1, "generate", {"samples": table_from_rows("samples", rows)})
    ckpt = root / "runs" / "r1" / "checkpoints" / "round=1"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (root / "mlflow.db").write_bytes(b"mlflow")
    return root


@pytest.fixture
def store(base_store: Path, tmp_path: Path) -> Path:
    """A fresh copy of ``base_store`` for one test."""
    return Path(shutil.copytree(base_store, tmp_path / "out"))


def run_config(tmp_path: Path, world, name: str = "run.yaml", **over) -> Path:
    """A small `npd run` config on the tiny world; ``over`` replaces whole sections/keys."""
    cfg = {
        "rounds": 1,
        "threads": 1,
        "models": {"teacher": str(world.teacher), "student": str(world.student)},
        "data": {
            "prompts": str(world.train_prompts),
            "eval_prompts": str(world.eval_prompts),
            "prompts_per_round": 16,
            "eval_size": 16,
        },
        "generate": {"max_new_tokens": 24},
        "train": {"steps_per_round": 2, "rows_per_step": 2},
        "pack": {"max_seq_len": 128},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def refused(capfd, out: Path, args: list, needles: list[str], exit_code: int | None) -> str:
    """Run a command that must be refused; the output directory must come out unchanged."""
    before = snapshot(out)
    code, err = npd(capfd, *args)
    line = assert_one_error(code, err, needles, exit_code)
    assert snapshot(out) == before
    return line


# ------------------------------------------------------------------------------ config

CONFIG_CASES = {
    "invalid_yaml": ("rounds: [\n", ["bad.yaml", "line 2", "invalid YAML"]),
    "unknown_key": ("trian: {}\n", ["bad.yaml", "unknown key 'trian'", "did you mean 'train'"]),
    "negative_rounds": ("rounds: -1\n", ["bad.yaml", "'rounds'"]),
    "wrong_type": ("rounds: many\n", ["bad.yaml", "'rounds'"]),
    "q_low_ge_q_high": (
        "filter: {rule: band, q_low: 0.9, q_high: 0.5}\n",
        ["filter", "q_low (0.9)"],
    ),
    "top_k_zero": ("score: {top_k: 0}\n", ["bad.yaml", "score.top_k"]),
    "not_a_mapping": ("- rounds\n", ["bad.yaml", "mapping"]),
    "nul_in_path": ('models: {teacher: "a\\0b"}\n', ["bad.yaml", "'models.teacher'", "NUL"]),
    "primary_names_no_set": (
        "eval: {sets: {gsm: a.jsonl, math: b.jsonl}, primary: mmlu}\n",
        ["bad.yaml", "'eval.primary'", "'mmlu' names no eval set", "gsm, math"],
    ),
    "eval_prompts_and_sets": (
        "data: {eval_prompts: a.jsonl}\neval: {sets: {gsm: b.jsonl}}\n",
        ["bad.yaml", "data.eval_prompts and eval.sets are both set", "remove data.eval_prompts"],
    ),
    "eval_set_name": ("eval: {sets: {'gsm 8k': a.jsonl}}\n", ["'eval.sets'", "'gsm 8k'"]),
    "no_learner_process": ("train: {nproc: 0}\n", ["bad.yaml", "'train.nproc'", "(got 0)"]),
    "unknown_strategy": (
        "train: {strategy: zero3}\n",
        ["bad.yaml", "'train.strategy'", "'ddp' or 'fsdp'", "(got 'zero3')"],
    ),
    "a_row_per_rank": (
        "train: {nproc: 4, rows_per_step: 2}\n",
        ["bad.yaml", "train.rows_per_step (2) < train.nproc (4)", "raise rows_per_step"],
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_file(case, capfd, store, tmp_path):
    content, needles = CONFIG_CASES[case]
    (tmp_path / "bad.yaml").write_text(content)
    refused(capfd, store, ["run", tmp_path / "bad.yaml", "--out", store], needles, 2)


def test_missing_config_file(capfd, store, tmp_path):
    missing = tmp_path / "nope.yaml"
    refused(capfd, store, ["run", missing, "--out", store], [str(missing), "not found"], 2)


def test_max_seq_len_below_longest_prompt(capfd, store, tmp_path, tiny_world):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "long", "prompt": "1," * 20 + "="}) + "\n")  # 41 tokens
    cfg = run_config(tmp_path, tiny_world, data={"prompts": str(prompts)}, pack={"max_seq_len": 16})
    needles = ["pack.max_seq_len=16", "prompt 'long'", "data.prompts"]
    refused(capfd, store, ["run", cfg, "--out", store], needles, 2)


def test_relative_paths_resolve_against_the_config_folder(
    capfd, store, tmp_path, tiny_world, monkeypatch
):
    """A relative prompts path means next to the config, not the working directory."""
    cfg = run_config(tmp_path / "cfgdir", tiny_world, data={"prompts": "prompts.jsonl"})
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1,2="}\n')  # in the cwd: not used
    monkeypatch.chdir(tmp_path)
    want = str(tmp_path / "cfgdir" / "prompts.jsonl")
    refused(capfd, store, ["run", cfg, "--out", store], [want, "not found"], 2)


# ------------------------------------------------------------------------------ models


def _copy_checkpoint(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    for name, fn in edit.items():
        data = json.loads((dst / name).read_text())
        fn(data)
        (dst / name).write_text(json.dumps(data))
    return dst


def _huge(cfg: dict) -> None:
    cfg.update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=256)
    cfg.pop("layer_types", None)  # transformers derives it from num_hidden_layers


MODEL_CASES = {
    "teacher_missing": ("teacher", None, ["models.teacher", "does not exist"]),
    "student_not_hf": ("student", {}, ["models.student", "no config.json"]),
    "unknown_architecture": (
        "student",
        {"config.json": lambda c: c.update(model_type="no_such_arch")},
        ["models.student", "config.json"],
    ),
    "vocab_mismatch": (
        "student",
        {"tokenizer.json": lambda t: t["model"]["vocab"].update({"#": 999})},
        ["models:", "different vocabularies", "no vocabulary mapping"],
    ),
    "too_large_for_memory": (
        "teacher",
        {"config.json": _huge},
        ["models.teacher", "GiB", "more than this machine's"],
    ),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model(case, capfd, store, tmp_path, tiny_world):
    role, edit, needles = MODEL_CASES[case]
    path = tmp_path / "model"
    if edit == {}:
        path.mkdir()
    elif edit is not None:
        _copy_checkpoint(getattr(tiny_world, role), path, edit)
    models = {"teacher": str(tiny_world.teacher), "student": str(tiny_world.student), role: path}
    cfg = run_config(tmp_path, tiny_world, models={k: str(v) for k, v in models.items()})
    refused(capfd, store, ["run", cfg, "--out", store], [*needles, str(path)], 2)


# ------------------------------------------------------------------------------ prompts

PROMPT_CASES = {
    "malformed_line": (b'{"prompt": "1,2="}\n{"prompt": \n', [":2: malformed JSON"]),
    "missing_prompt_field": (b'{"prompt": "1,2="}\n{"id": 3}\n', [":2: missing"]),
    "empty_prompt": (b'{"prompt": "  "}\n', [":1: empty 'prompt'"]),
    "duplicate_ids": (b'{"id": 1, "prompt": "1="}\n{"id": "1", "prompt": "2="}\n', [":2: dup"]),
    "non_utf8": (b'{"prompt": "1,2="}\n{"prompt": "\xff\xfe"}\n', [":2: not UTF-8"]),
    "empty_file": (b"", ["no prompts"]),
    "longer_than_context": (
        (json.dumps({"id": "big", "prompt": "1," * 300 + "="}) + "\n").encode(),
        ["data.prompts", "prompt 'big' has 601 tokens", "context of 512"],
    ),
}


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_bad_prompts_file(case, capfd, store, tmp_path, tiny_world):
    content, needles = PROMPT_CASES[case]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content)
    cfg = run_config(tmp_path, tiny_world, data={"prompts": str(prompts)})
    name = [] if case == "longer_than_context" else [str(prompts)]
    refused(capfd, store, ["run", cfg, "--out", store], [*name, *needles], 2)


def test_missing_prompts_file(capfd, store, tmp_path, tiny_world):
    missing = tmp_path / "gone.jsonl"
    cfg = run_config(tmp_path, tiny_world, data={"eval_prompts": str(missing)})
    refused(capfd, store, ["run", cfg, "--out", store], [str(missing), "not found"], 2)


def test_missing_eval_set_file(capfd, store, tmp_path, tiny_world):
    missing = tmp_path / "gone.jsonl"
    sets = {"sorted": str(tiny_world.eval_prompts), "math": str(missing)}
    cfg = run_config(tmp_path, tiny_world, data={"eval_prompts": None}, eval={"sets": sets})
    needles = ["eval.sets.math", str(missing), "not found"]
    refused(capfd, store, ["run", cfg, "--out", store], needles, 2)


# ------------------------------------------------------------------------------ datasets


def _parquet(rows: list[dict]):
    def write(d: Path) -> Path:
        pq.write_table(pa.Table.from_pylist(rows), d / "train.parquet")
        return d / "train.parquet"

    return write


def _bytes_as_parquet(d: Path) -> Path:
    (d / "train.parquet").write_text('id,prompt\n1,"1,2="\n')  # a CSV under a Parquet name
    return d / "train.parquet"


def _several_splits(d: Path) -> Path:
    ds = datasets.Dataset.from_list([{"prompt": "1,2="}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(d / "saved"))
    return d / "saved"


def _shards_sharing_an_id(d: Path) -> Path:
    (d / "shards").mkdir()
    for i in range(2):
        rows = [{"id": f"own-{i}", "prompt": "1,2="}, {"id": "same", "prompt": f"{i},3="}]
        pq.write_table(pa.Table.from_pylist(rows), d / "shards" / f"part-{i}.parquet")
    return d / "shards"


def _hub_name(d: Path) -> str:
    return "openai/gsm8k"  # relative, and no such folder beside the config


USER = {"role": "user", "content": "1,2="}
DATA_CASES = {
    "missing_column": (
        _parquet([{"question": "1,2="}]),
        ["no column 'prompt' or 'messages' (columns: question)", "data.prompt_field"],
    ),
    "messages_as_a_json_string": (
        _parquet([{"messages": json.dumps([USER])}]),
        ["column 'messages' holds string, not a list of turns", "json.loads"],
    ),
    "turn_without_role": (
        _parquet([{"messages": [{"content": "1,2="}]}]),
        ["row 0: field 'messages'[0]: turn without a string 'role'"],
    ),
    "turn_without_content": (
        _parquet([{"messages": [USER]}, {"messages": [{"role": "user"}]}]),
        ["row 1: field 'messages'[0]: 'content' of a user turn is null"],
    ),
    "content_null": (
        _parquet([{"messages": [{"role": "system", "content": None}, USER]}]),
        ["row 0: field 'messages'[0]: 'content' of a system turn is null"],
    ),
    "unknown_role": (
        _parquet([{"messages": [{"role": "bot", "content": "1,2="}]}]),
        ["row 0: field 'messages'[0]: unknown role 'bot'", "system, user, assistant"],
    ),
    "empty_messages": (
        _parquet([{"messages": [USER]}, {"messages": []}]),
        ["row 1: field 'messages': empty list of turns"],
    ),
    "not_parquet": (_bytes_as_parquet, ["not a Parquet file"]),
    "several_splits_and_no_split": (
        _several_splits,
        ["splits train, test and no data.split is set", "set data.split"],
    ),
    "duplicate_ids_across_shards": (
        _shards_sharing_an_id,
        ["part-1.parquet: row 1: duplicate id 'same' (also at ", "part-0.parquet: row 1)"],
    ),
    "hub_name": (_hub_name, ["npd never downloads", "save_to_disk(DIR)"]),
    "conversation_without_a_chat_template": (  # the toy's tokenizer has none
        _parquet([{"messages": [{"role": "system", "content": "sort"}, USER]}]),
        ["data.prompts: prompt 'train-0'", "need the tokenizer's chat template and it has none"],
    ),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_dataset(case, capfd, store, tmp_path, tiny_world):
    """Parquet, folders of shards, save_to_disk folders and conversational rows: one line naming
    the file, the row and the field; nothing written."""
    write, needles = DATA_CASES[case]
    (tmp_path / "data").mkdir()
    source = write(tmp_path / "data")
    cfg = run_config(tmp_path, tiny_world, data={"prompts": str(source)})
    at_fault = tiny_world.student if case == "conversation_without_a_chat_template" else source
    refused(capfd, store, ["run", cfg, "--out", store], [str(at_fault), *needles], 2)


def test_train_prompts_in_the_eval_set(capfd, store, tmp_path, tiny_world):
    """A held-out prompt that is also a train prompt (exact text) refuses the run, naming the set,
    the count and data.allow_overlap."""
    train = tiny_world.train_prompts.read_text().splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join([*train[3:5], *tiny_world.eval_prompts.read_text().splitlines()]))
    cfg = run_config(tmp_path, tiny_world, data={"eval_prompts": str(held)})
    needles = ["data.eval_prompts: 2 of its 66 prompts are also train prompts", "allow_overlap"]
    refused(capfd, store, ["run", cfg, "--out", store], needles, 2)


# ------------------------------------------------------------------------------ store


def _foreign(out: Path) -> None:
    (out / "README.md").write_text("another project\n")
    (out / "data.csv").write_text("a,b\n1,2\n")


def _other_marker(out: Path) -> None:
    (out / MARKER_NAME).write_text(json.dumps({"schema_version": 1, "project": "other"}))


def _newer(out: Path) -> None:
    marker = {"schema_version": SCHEMA_VERSION + 1, "project": "npd"}
    (out / MARKER_NAME).write_text(json.dumps(marker))


OUT_CASES = {
    # what marks an npd store: npd-store.json naming project "npd"; anything else non-empty is
    # someone else's folder and is refused rather than written into
    "another_projects_folder": (_foreign, ["not an npd output directory", "npd-store.json"], 2),
    "marker_of_another_project": (_other_marker, ["npd-store.json", "project 'other'"], 2),
    "newer_schema": (_newer, ["npd-store.json", "newer npd", "upgrade npd"], 1),
}


@pytest.mark.parametrize("command", ["run", "demo"])
@pytest.mark.parametrize("case", OUT_CASES)
def test_out_is_not_ours(case, command, capfd, tmp_path, tiny_world):
    prepare, needles, exit_code = OUT_CASES[case]
    out = tmp_path / "theirs"
    out.mkdir()
    prepare(out)
    args = ["run", run_config(tmp_path, tiny_world)] if command == "run" else ["demo"]
    refused(capfd, out, [*args, "--out", out], [str(out), *needles], exit_code)


def test_missing_vllm_extra_fails_before_the_toy_world(capfd, tmp_path, monkeypatch):
    """`backend: vllm` without the extra is refused in seconds, before minutes of toy-world
    training, and nothing is written."""
    from npd_core.backends import vllm as vllm_backend

    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    cfg = tmp_path / "vllm.yaml"
    cfg.write_text("generate: {backend: vllm}\n")
    out = tmp_path / "out"
    code, err = npd(capfd, "demo", "--config", cfg, "--out", out)
    assert_one_error(code, err, ["generate.backend", "make vllm"], 2)
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.fixture
def read_only(store: Path):
    """``store`` made unwritable. Root ignores permission bits, so as root it becomes a
    read-only bind mount of itself (skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        yield store
        for p, mode in modes.items():
            p.chmod(mode)
        return
    bind = subprocess.run(["mount", "--bind", str(store), str(store)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"root cannot mount here ({bind.stderr.decode().strip()})")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(store)], check=True)
        yield store
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_out_not_writable(capfd, read_only, tmp_path, tiny_world):
    cfg = run_config(tmp_path, tiny_world)
    needles = [str(read_only), "cannot write", "writable --out"]
    refused(capfd, read_only, ["run", cfg, "--out", read_only], needles, 1)


@pytest.mark.parametrize("where", ["out_is_a_file", "out_under_a_file"])
def test_out_path_blocked_by_a_file(where, capfd, tmp_path, tiny_world):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    out = blocker if where == "out_is_a_file" else blocker / "out"
    cfg = run_config(tmp_path / "cfg", tiny_world)
    exit_code = 2 if where == "out_is_a_file" else 1
    refused(capfd, tmp_path, ["run", cfg, "--out", out], [str(out)], exit_code)


@pytest.fixture
def locked(store: Path):
    """Another program holds ``npd.duckdb`` open for writing (as a notebook's default
    ``duckdb.connect`` does); it is killed, not closed, so it cannot touch the file either."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
            "time.sleep(600)",
            str(store / "npd.duckdb"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    yield store, holder.pid
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("command", ["run", "sql", "status"])
def test_duckdb_locked_by_a_writer(command, capfd, store, tmp_path, tiny_world, locked):
    db = store / "npd.duckdb"
    args = {
        "run": ["run", run_config(tmp_path, tiny_world), "--out", store],
        "sql": ["sql", "select count(*) from samples", "--db", db],
        "status": ["status", "--out", store],
    }[command]
    before = snapshot_files(store)
    code, err = npd(capfd, *args)
    assert_one_error(code, err, [str(db), "locked by another program", f"PID {locked[1]}"], 1)
    assert snapshot_files(store) == before


def snapshot_files(out: Path) -> dict:
    """The file half of ``snapshot`` (the views cannot be read while a writer holds the db)."""
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in out.rglob("*")
        if p.is_file()
    }


# ------------------------------------------------------------------------ npd sql, status, retry

SQL_CASES = {
    "syntax_error": ("selec 1", ["npd sql", "syntax error"]),
    "delete": ("delete from samples", ["npd sql is read-only", "DELETE"]),
    "create_table": ("create table t as select 1", ["npd sql is read-only", "CREATE"]),
    "copy_to_file": ("copy (select 1) to 'x.csv'", ["npd sql is read-only", "COPY"]),
    "drop_view": ("drop view samples", ["npd sql is read-only", "DROP"]),
    "unknown_table": ("select * from nope", ["nope", "Views:", "samples", "runs"]),
}


@pytest.mark.parametrize("case", SQL_CASES)
def test_sql_refused(case, capfd, store):
    query, needles = SQL_CASES[case]
    refused(capfd, store, ["sql", query, "--db", store / "npd.duckdb"], needles, 2)


@pytest.mark.parametrize("name", ["missing.duckdb", "garbage.duckdb", MARKER_NAME])
def test_sql_on_a_file_that_is_no_store(name, capfd, store):
    path = store / name
    if name == "garbage.duckdb":
        path.write_bytes(b"not a database")
    needles = [str(path), "no npd database" if name == "missing.duckdb" else "DuckDB cannot open"]
    refused(capfd, store, ["sql", "select 1", "--db", path], needles, 2)


@pytest.mark.parametrize("command", ["status", "retry"])
def test_unknown_run_id(command, capfd, store):
    refused(capfd, store, [command, "nope", "--out", store], ["no run 'nope'", "npd status"], 2)


# ------------------------------------------------------------------------------ run time (slow)


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory, prefect_api) -> dict[str, str]:
    """Environment of the subprocess runs: they report to the session's Prefect server (an
    ephemeral API of their own would start with each run; the Ctrl-C test keeps one)."""
    return {"PREFECT_API_URL": prefect_api.api, "PREFECT_HOME": str(tmp_path_factory.mktemp("p"))}


def _npd(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NPD, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        **kw,
    )


def _sql(out: Path, query: str) -> list[dict]:
    r = _npd("sql", query, "--db", out / "npd.duckdb", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _no_partial_stage(out: Path) -> None:
    """No hidden temp/trash left and every visible shard reads whole."""
    assert [p for p in out.joinpath("runs").rglob(".*") if ".tmp" in p.name] == []
    for shard in out.joinpath("runs").rglob("*.parquet"):
        with duckdb.connect() as con:
            con.sql(f"SELECT count(*) FROM read_parquet('{shard}')").fetchall()


@pytest.mark.slow
def test_every_sample_filtered_is_a_warning(tmp_path, tiny_world, prefect):
    """The one run-time case that is not an error: the round is recorded with its reasons,
    training skips it, the run goes on, exit 0."""
    band = {"rule": "band", "abs_low": 1000.0, "abs_high": 2000.0}
    cfg = run_config(tmp_path, tiny_world, rounds=2, filter=band)
    out = tmp_path / "out"
    r = _npd("run", cfg, "--out", out, "--json", env=prefect)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "round 1 kept none of its 16 samples" in warnings[0]
    assert "below_band" in warnings[0] and "training skipped it" in warnings[0]
    summary = json.loads(r.stdout)
    assert [x["n_kept"] for x in summary["rounds"]] == [0, 0]
    assert [x["train_tokens"] for x in summary["rounds"]] == [0, 0]
    rounds = _sql(out, "select round, n_generated, n_kept from rounds order by round")
    assert rounds == [{"round": k, "n_generated": 16, "n_kept": 0} for k in (1, 2)]
    reasons = _sql(out, "select count(*) n from samples where filter_reason is null")
    assert reasons == [{"n": 0}]
    assert _sql(out, "select status from runs") == [{"status": "completed"}]


def _sitecustomize(tmp_path: Path, code: str) -> dict[str, str]:
    """Env that runs ``code`` at the start of the npd subprocess (and of no other process)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.getcwd()])}


NAN_LOSS = """
import npd_core.method.losses as losses
_mean = losses.token_mean
losses.token_mean = lambda *args, **kw: _mean(*args, **kw) * float("nan")
"""


@pytest.mark.slow
def test_non_finite_loss_stops_the_round(tmp_path, tiny_world, prefect):
    """A NaN loss in round 1 stops it with one line naming the last good checkpoint (θ_0), and
    no θ_1 or train stage is written. No config makes the tiny world's loss non-finite for sure
    (lr = 1 only drove it to 30), so the loss's reduction is made NaN in the npd subprocess;
    tests/npd_core/test_train.py has a real NaN from the targets."""
    env = {**_sitecustomize(tmp_path, NAN_LOSS), **prefect}
    out = tmp_path / "out"
    r = _npd("run", run_config(tmp_path, tiny_world), "--out", out, env=env)
    line = assert_one_error(r.returncode, r.stderr, ["round 1:", "non-finite loss (nan)"], 1)
    assert f"last good checkpoint: {tiny_world.student}" in line
    assert not list(out.glob("runs/*/checkpoints/round=1")) and not list(out.glob("runs/*/*/train"))
    _no_partial_stage(out)


FULL_DISK = """
import errno, os
_fsync = os.fsync
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else str(fd)
    if os.environ["NPD_TEST_FULL_AT"] in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return _fsync(fd)
os.fsync = fsync
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("marker", "target"),
    [("/.generate.tmp-", "round=1/generate"), ("/.round=1.tmp-", "checkpoints/round=1")],
    ids=["shard", "checkpoint"],
)
def test_disk_full_while_writing(marker, target, tmp_path, tiny_world, prefect):
    """ENOSPC from the real write path (fsync of the file just written, where a full disk or
    quota shows on many filesystems); injected by a sitecustomize in the npd subprocess only."""
    env = {**_sitecustomize(tmp_path, FULL_DISK), "NPD_TEST_FULL_AT": marker, **prefect}
    out = tmp_path / "out"
    r = _npd("run", run_config(tmp_path, tiny_world), "--out", out, env=env)
    needles = [target, "no space left on device", "free space", "npd retry"]
    assert_one_error(r.returncode, r.stderr, needles, 1)
    assert not list(out.glob(f"runs/*/{target}"))
    _no_partial_stage(out)


@pytest.mark.slow
def test_ctrl_c_mid_stage_then_retry(tmp_path, tiny_world, prefect_api):
    """SIGINT while round 1 is being produced (NPD_PAUSE_AT holds the run as its scores are
    written, so the signal lands there every time): exit 130, one line saying how to resume, no
    partial stage; `npd retry RUN_ID` then finishes the run. Each runs its own ephemeral Prefect
    API, as a user without a server does."""
    cfg = run_config(tmp_path, tiny_world, rounds=2)
    prefect = prefect_api.ephemeral_env(tmp_path / "prefect")
    out, env = tmp_path / "out", {**os.environ, **prefect, "NPD_PAUSE_AT": "write:score:1"}
    proc = subprocess.Popen(
        [*NPD, "run", str(cfg), "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # as from a terminal: a pytest-xdist worker ignores SIGINT, and a child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _, how = os.waitpid(proc.pid, os.WUNTRACED)  # returns when it stops at the point
    assert os.WIFSTOPPED(how), proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGINT)  # delivered as it continues, as a Ctrl-C right then
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    run_id = next(out.glob("runs/*")).name
    line = assert_one_error(proc.returncode, err, ["interrupted"], 130)
    assert f"`npd retry {run_id} --out {out}`" in line
    _no_partial_stage(out)
    done = _npd("retry", run_id, "--out", out, "--json", env=prefect)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [x["round"] for x in json.loads(done.stdout)["rounds"]] == [1, 2]
    assert len(_sql(out, "select * from samples")) == 2 * 16
