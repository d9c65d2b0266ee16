"""``npd bench filter --stage trained`` end to end on the tiny world, three of its cells (the
reference, the learner_ratio fence and its random drop, all with junk): junk
is planted in the runs, the random drop keeps, round by round, the share of sample-steps the
fence weighed above 0, and a second call resumes without running a cell again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from bench_config import TINY_BENCH
from typer.testing import CliRunner

from flows import filter_study
from flows.cli import app
from npd_core.bench import filter_trained as ft
from npd_core.store import Store

DOCS = Path(__file__).resolve().parents[2] / "docs"
CFG = TINY_BENCH
CELLS = [
    ft.TrainedCell("none-keep", None, "junk", 0),
    ft.TrainedCell("fence", "learner_ratio", "junk", 0),
    ft.TrainedCell("random", "learner_ratio", "junk", 0),
]


@pytest.mark.slow
def test_the_trained_stage_plants_matches_and_resumes(
    tmp_path, tiny_world, prefect_server, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # prefect_env's changes are undone
    monkeypatch.setattr(ft, "trained_cells", lambda best: CELLS)
    w = tiny_world
    cfg = tmp_path / "tiny.yaml"
    data = {**CFG["data"], "prompts": str(w.train_prompts), "eval_prompts": str(w.eval_prompts)}
    models = {"teacher": str(w.teacher), "student": str(w.student)}
    cfg.write_text(yaml.safe_dump({**CFG, "models": models, "data": data}))
    out = tmp_path / "out"
    args = ["bench", "filter", "--stage", "trained", "--json", "--budget-s", "2"]
    args += ["--config", str(cfg), "--out", str(out), "--junk", str(DOCS / "filter-junk.json")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "filter study trained: 3 cells (3 to run) of 2 s" in res.stderr  # and an estimate
    rep = json.loads(res.stdout)
    assert rep["junk_scores"] == ["learner_ratio", "teacher_nll"]
    cells = {c["name"]: c for c in rep["cells"]}
    assert list(cells) == [c.name for c in CELLS]
    store = Store(out, create=False)
    q = """SELECT round, count(*) FILTER (WHERE source = 'junk-stale') AS stale,
                  count(*) FILTER (WHERE source = 'junk-loop') AS loop
           FROM samples WHERE run_id = ? GROUP BY round"""
    for name, c in cells.items():
        rounds = store.query(q, [c["run_id"]]).to_pylist()
        assert rounds and {(x["stale"], x["loop"]) for x in rounds} == {(2, 3)}, name  # 15% of 32
    fence, rand = cells["fence-learner_ratio-junk-s0"], cells["random-learner_ratio-junk-s0"]
    assert rand["matches"] == fence["name"] and fence["kept_by_round"]
    spec = json.loads(store.query("SELECT config_json FROM runs WHERE run_id = ?", [rand["run_id"]])
                      .to_pylist()[0]["config_json"])  # fmt: skip
    want = {str(r): x for r, x in fence["kept_by_round"].items()}
    assert spec["filter"]["rule"] == "random" and spec["filter"]["keep_by_round"] == want
    assert set(rep["plot"]) == {"junk", "final"}
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in rep["plot"].values())
    assert rep["final_score_rule"] == ft.FINAL_RULE
    ran = []
    monkeypatch.setattr(filter_study, "run_trained_cell", lambda *a: ran.append(a))
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert ran == [] and json.loads(again.stdout)["cells"] == rep["cells"]
