"""The npd command as a user runs it: config files, sql output modes, refusals, a live run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from resume_checks import NPD, npd_env
from typer.testing import CliRunner

from flows.cli import app
from npd_core.store import SCHEMA_VERSION, Store, table_from_rows

runner = CliRunner()


def test_config_init_then_show_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    assert runner.invoke(app, ["config", "init", str(p)]).exit_code == 0
    text = p.read_text()
    assert "# distillation rounds" in text and "q_low: 0.05" in text
    shown = runner.invoke(app, ["config", "show", str(p)])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.stdout)["filter"]["q_high"] == 0.9


def _cli(*args, cwd=None):
    return subprocess.run([*NPD, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("rounds: -1\n", "rounds"),
        ("filter: {rule: band, q_low: 0.9, q_high: 0.5}\n", "q_low"),
        ("trian: {}\n", "did you mean 'train'"),
        ("score: {top_k: 0}\n", "score.top_k"),
        ("rounds: [\n", "invalid YAML"),
        (
            "eval: {when: end}\norchestration: {generate_pool: a, train_pool: b}\n",
            "eval.when: end runs in-process rounds only",
        ),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, content, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(content)
    r = _cli("config", "show", str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert str(p) in lines[0] and "Traceback" not in r.stderr


def _store_with_samples(root: Path) -> Path:
    store = Store(root)
    rows = [
        dict(
            run_id="r",
            round=1,
            prompt_id=f"p{i}",
            sample_idx=0,
            prompt="q",
            response="a",
            prompt_token_ids=[1],
            response_token_ids=[2, 3],
            generator_checkpoint="c",
            backend="hf",
            temperature=1.0,
            top_p=1.0,
            seed=0,
            teacher="t",
            prompt_tokens=1,
            response_tokens=2,
            finished=True,
            created_at=__import__("datetime").datetime.now(__import__("datetime").UTC),
        )
        for i in range(3)
    ]
    store.write_stage("r", 1, "generate", {"samples": table_from_rows("samples", rows)})
    return store.db_path


def test_sql_json_csv_and_refusals(tmp_path):
    db = _store_with_samples(tmp_path)
    r = runner.invoke(
        app,
        [
            "sql",
            "select prompt_id, response_tokens from samples order by 1",
            "--db",
            str(db),
            "--json",
        ],
    )
    assert r.exit_code == 0
    assert json.loads(r.stdout) == [{"prompt_id": f"p{i}", "response_tokens": 2} for i in range(3)]
    r = runner.invoke(app, ["sql", "select count(*) as n from samples", "--db", str(db), "--csv"])
    assert r.stdout.splitlines() == ["n", "3"]
    for query, needle in [
        ("delete from samples", "read-only"),
        ("select * from nope", "samples"),
        ("selec 1", "syntax"),
    ]:
        res = _cli("sql", query, "--db", str(db))
        assert res.returncode != 0 and res.stderr.startswith("error:"), res.stderr
        assert needle in res.stderr.lower() and len(res.stderr.strip().splitlines()) == 1
    res = _cli("sql", "select 1", "--db", str(tmp_path / "missing.duckdb"))
    assert res.returncode != 0 and "missing.duckdb" in res.stderr


def _write_run_config(tmp_path, world, prompts_per_round: int, steps: int) -> None:
    """tmp_path/run.yaml: a 2-round `npd run` on the tiny world."""
    cfg = {
        "rounds": 2,
        "threads": 1,
        "models": {"teacher": str(world.teacher), "student": str(world.student)},
        "data": {
            "prompts": str(world.train_prompts),
            "eval_prompts": str(world.eval_prompts),
            "prompts_per_round": prompts_per_round,
        },
        "generate": {"max_new_tokens": 32},
        "train": {"steps_per_round": steps, "rows_per_step": steps},
        "pack": {"max_seq_len": 128},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.slow
def test_sql_answers_while_a_run_writes(tmp_path, tiny_world, prefect_api):
    """A real `npd run` in a subprocess, stopped (NPD_PAUSE_AT) while round 2's samples are
    written but not yet renamed into place: `npd sql` answers and sees round 1's samples only;
    the run then goes on and `npd sql` sees both rounds."""
    _write_run_config(tmp_path, tiny_world, prompts_per_round=32, steps=2)
    out = tmp_path / "out"
    env = npd_env(prefect_api, tmp_path / "prefect", NPD_PAUSE_AT="write:generate:2")
    db = out / "npd.duckdb"
    q = "select round, count(*) as n from samples group by round order by round"
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the run
        proc = subprocess.Popen(
            [*NPD, "run", str(tmp_path / "run.yaml"), "--out", str(out), "--json"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    _, how = os.waitpid(proc.pid, os.WUNTRACED)  # returns when it stops at the point
    assert os.WIFSTOPPED(how), log.read_text()[-3000:]
    try:
        assert list(out.glob("runs/*/round=2/.generate.tmp-*/samples.parquet"))
        during = _cli("sql", q, "--db", str(db), "--json")
        assert during.returncode == 0, during.stderr
        assert json.loads(during.stdout) == [{"round": 1, "n": 32}]
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]
    summary = json.loads(stdout)  # stdout holds exactly one JSON object
    assert summary["rounds"][-1]["round"] == 2 and summary["db"] == str(db.resolve())
    after = _cli("sql", q, "--db", str(db), "--json")
    assert json.loads(after.stdout) == [{"round": 1, "n": 32}, {"round": 2, "n": 32}]


# What schemas 3 and 4 added, per table: an output directory of schema 2 lacks exactly these
# columns.
OLD_CONFIG = Path(__file__).parents[1] / "data" / "config-npd-6a4d80c.json"
SCHEMA_3_COLUMNS = {
    "scores": ["student_forward_kl_sum"],
    "filter": ["rule", "rule_params"],
    "rounds": ["filter_rule", "dropped_kl_share"],
    "evals": ["eval_set"],  # schema 4
    "prompts": ["eval_set"],  # schema 4
}
SCHEMA_2_SAMPLES_VIEW = """
CREATE OR REPLACE VIEW samples AS
SELECT g.*, s.teacher_logprob_sum, s.student_logprob_sum, s.teacher_resp_logprob_sum,
       s.student_resp_logprob_sum, s.ifd_teacher, s.ifd_student, s.delta_ifd,
       f.kept, f.filter_reason
FROM read_parquet(['.npd/empty/samples.parquet', 'runs/*/round=*/generate/samples.parquet'],
                  hive_partitioning = false, allow_empty = true) AS g
LEFT JOIN scores AS s ON s.run_id = g.run_id AND s.round = g.round
      AND s.prompt_id = g.prompt_id AND s.sample_idx = g.sample_idx
LEFT JOIN read_parquet(['.npd/empty/filter.parquet', 'runs/*/round=*/filter/filter.parquet'],
                       hive_partitioning = false, allow_empty = true) AS f
       ON f.run_id = g.run_id AND f.round = g.round
      AND f.prompt_id = g.prompt_id AND f.sample_idx = g.sample_idx
"""


def _as_schema_2(out: Path) -> None:
    """Turn ``out`` into what npd of store schema 2 wrote: no schema-3/4 columns in any shard or
    placeholder, the old filter config (``enabled`` + quantiles) in every runs row, the old
    samples view and version 2 in the database and the marker. (The run's spec.json keeps the
    config this run began with: what a retry keys its cache on; that an old run's config gives
    the old key is test_config_of_an_older_npd_loads_and_keys_its_cache_as_before.)"""
    import duckdb
    import pyarrow.parquet as pq

    for table, columns in SCHEMA_3_COLUMNS.items():
        shards = out.glob(f"runs/*/**/{table}.parquet")
        for f in [*shards, out / f".npd/empty/{table}.parquet"]:
            pq.write_table(pq.read_table(f).drop_columns(columns), f)
    old_filter = json.loads(OLD_CONFIG.read_text())["filter"]
    for f in out.glob("runs/*/run/runs.parquet"):
        t = pq.read_table(f)
        cfg = [json.loads(x) | {"filter": old_filter} for x in t.column("config_json").to_pylist()]
        i = t.schema.get_field_index("config_json")
        pq.write_table(t.set_column(i, "config_json", [[json.dumps(c) for c in cfg]]), f)
    (out / "npd-store.json").write_text(json.dumps({"schema_version": 2, "project": "npd"}))
    with duckdb.connect(str(out / "npd.duckdb")) as con:
        con.execute(f"SET file_search_path = '{out}'")
        con.execute("CREATE OR REPLACE VIEW store_meta AS SELECT 2 AS schema_version")
        con.execute(SCHEMA_2_SAMPLES_VIEW)


def test_config_of_an_older_npd_loads_and_keys_its_cache_as_before():
    """The defaults as npd dumped them at 6a4d80c (store schema 2, ``filter.enabled``): they
    load as ``rule: band`` with a warning, and the stage cache key of a run that began then is
    the digest that version computed (printed by it: d42ce37201a46ea4), so `npd retry` finds the
    finished stages."""
    from npd_core.config import NPDConfig, config_digest

    old = json.loads(OLD_CONFIG.read_text())
    with pytest.warns(FutureWarning, match="filter.enabled: True is now filter.rule: band"):
        cfg = NPDConfig.model_validate(old)
    assert (cfg.filter.rule, cfg.filter.q_low, cfg.filter.q_high) == ("band", 0.05, 0.9)
    assert config_digest(old) == "d42ce37201a46ea4"
    new = cfg.model_dump(mode="json")
    for section, values in old.items():  # every other old setting reads back unchanged
        if section != "filter":
            got = new[section]
            kept = {k: got[k] for k in values} if isinstance(values, dict) else got
            assert kept == values, section


@pytest.mark.slow
def test_failed_run_then_npd_retry(tmp_path, tiny_world, prefect_api):
    """`npd run` fails in round 2 (injected); the output directory is turned into one written by
    npd of store schema 2 (before the filter rules); `npd status` reads it and `npd retry RUN_ID`
    finishes the run from the cache; rows written before carry no rule, the new ones do."""
    _write_run_config(tmp_path, tiny_world, prompts_per_round=32, steps=2)
    out = tmp_path / "out"
    # on the session's server (test_bad_input's Ctrl-C test runs and retries on an ephemeral API)
    env = npd_env(prefect_api, tmp_path / "prefect", NPD_FAIL_AT="score:2")
    run = subprocess.run(
        [*NPD, "run", str(tmp_path / "run.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "injected failure in score of round 2" in run.stderr and "Traceback" not in run.stderr
    _as_schema_2(out)
    db = str(out / "npd.duckdb")
    run_id = json.loads(_cli("sql", "select run_id from runs", "--db", db, "--json").stdout)[0]
    q = "select round, min(created_at)::varchar t from samples group by round order by round"
    before = json.loads(_cli("sql", q, "--db", db, "--json").stdout)
    status = _cli("status", run_id["run_id"], "--out", str(out), "--json")
    assert status.returncode == 0, status.stderr
    (shown,) = json.loads(status.stdout)
    assert shown["status"] == "failed" and [x["round"] for x in shown["rounds"]] == [0, 1]
    # evaluations written before eval sets are the one default set's
    assert [(x["eval_set"], list(x["scores"])) for x in shown["rounds"]] == [
        ("heldout", ["heldout"])
    ] * 2
    retry = subprocess.run(
        [*NPD, "retry", run_id["run_id"], "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert json.loads(retry.stdout)["rounds"][-1]["round"] == 2
    after = json.loads(_cli("sql", q, "--db", db, "--json").stdout)
    assert after[:2] == before[:2]  # rounds 1 and 2 generated once: cached, not regenerated
    rules = "select round, filter_rule, count(*) n from samples group by all order by round"
    assert json.loads(_cli("sql", rules, "--db", db, "--json").stdout) == [
        {"round": 1, "filter_rule": None, "n": 32},  # written before: no rule recorded
        {"round": 2, "filter_rule": "none", "n": 32},
    ]
    assert json.loads((out / "npd-store.json").read_text())["schema_version"] == SCHEMA_VERSION
    missing = _cli("retry", "nope", "--out", str(out))
    assert missing.returncode != 0 and "no run 'nope'" in missing.stderr


def test_command_lists_show_each_commands_help_reflowed():
    """`npd --help` (and `npd bench --help`, `npd config --help`) list every command with the
    first paragraph of its docstring on one line, as prose: typer's rich help kept the
    docstring's line breaks there ("… are picked" / "up. Each run …")."""
    import inspect

    for args, typer_app in [
        ([], app),
        *(([g.name], g.typer_instance) for g in app.registered_groups),
    ]:
        res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "1000"})
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        for c in typer_app.registered_commands:
            para = " ".join(inspect.getdoc(c.callback).split("\n\n")[0].split())
            assert any(para in line for line in lines), (args, c.callback.__name__)


def test_run_and_demo_take_key_value_overrides(tmp_path, monkeypatch):
    """`npd run CONFIG key=value …` and `npd demo key=value …` lay the pairs over the config (a
    YAML value each, `--rounds` last); an unknown key is one `error:` line that names it."""
    import npd_core.pipeline.resolve

    got = []

    def resolved(cfg, *args, **kw):
        got.append(cfg)
        raise SystemExit(0)  # the config is all this test needs

    monkeypatch.setattr(npd_core.pipeline.resolve, "resolve_spec", resolved)
    cfg = tmp_path / "run.yaml"
    paths = {"teacher": "t", "student": "s"}
    cfg.write_text(yaml.safe_dump({"models": paths, "data": {"prompts": "p", "eval_prompts": "e"}}))
    r = runner.invoke(app, ["run", str(cfg), "train.lr=2e-5", "filter.rule=band", "rounds=5"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["demo", "--rounds", "2", "rounds=7", "generate.top_p=0.5"])
    assert r.exit_code == 0, r.output
    run, demo = got
    assert (run.train.lr, run.filter.rule, run.rounds) == (2e-5, "band", 5)
    assert (demo.rounds, demo.generate.top_p) == (2, 0.5)
    bad = _cli("run", str(cfg), "train.lr=1e-4", "train.lrr=1e-4")
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("error: train.lrr=1e-4: unknown config key 'train.lrr'")
