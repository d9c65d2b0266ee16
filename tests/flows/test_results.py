"""Round results where users look (issue 19 items 4 and 6): a run scored on two eval sets, each
a metric in MLflow and a column in `npd status`, the best checkpoint chosen on the primary one;
every round a Prefect table artifact and the run a markdown summary, read back through the
Prefect client; the best checkpoint registered in the MLflow Model Registry (local sqlite) and
loaded back with ``mlflow.transformers.load_model``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from npd_core.pipeline.results import RunSummary
from npd_core.store import query

MODEL = "npd-tiny"


@dataclass
class Run:
    root: Path
    spec: dict
    res: RunSummary

    @property
    def db(self) -> Path:
        return self.root / "npd.duckdb"

    def sql(self, q: str) -> list[dict]:
        return query(self.db, q).to_pylist()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_world, prefect_server) -> Run:
    """One round on two eval sets: ``sorted`` (the tiny world's held-out prompts, graded by
    exact match) and ``loglik`` (16 of them without answers: the teacher's log-likelihood), the
    second one primary; the best checkpoint registered as ``npd-tiny``."""
    from flows.distill import distill_flow
    from npd_core.config import NPDConfig
    from npd_core.pipeline.resolve import resolve_spec
    from npd_core.pipeline.spec import RunSpec

    root = tmp_path_factory.mktemp("results")
    lines = tiny_world.eval_prompts.read_text().splitlines()[:16]
    no_answers = root / "no-answers.jsonl"
    no_answers.write_text(
        "".join(json.dumps(json.loads(x) | {"answer": None}) + "\n" for x in lines)
    )
    w = tiny_world
    cfg = NPDConfig.model_validate(
        {
            "rounds": 1,
            "threads": 1,
            "models": {"teacher": str(w.teacher), "student": str(w.student)},
            "data": {"prompts": str(w.train_prompts), "prompts_per_round": 16, "eval_size": 16},
            "generate": {"max_new_tokens": 24},
            "train": {"steps_per_round": 2, "rows_per_step": 2},
            "pack": {"max_seq_len": 128},
            "eval": {
                "batch_size": 64,
                "sets": {"sorted": str(w.eval_prompts), "loglik": str(no_answers)},
                "primary": "loglik",
            },
            "mlflow": {"register_best": MODEL},
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        spec, _ = resolve_spec(cfg, root / "out", "sets", log=lambda m: None)
        res = distill_flow(RunSpec(**spec))
    return Run(root / "out", spec, res)


def test_every_eval_set_is_scored_every_round_and_the_primary_one_decides(run):
    assert run.spec["eval_prompts"] == run.spec["eval_set_paths"]["loglik"]
    assert run.sql("select round, eval_set, metric, n from evals order by round, eval_set") == [
        {"round": r, "eval_set": s, "metric": m, "n": 16}
        for r in (0, 1)
        for s, m in (("loglik", "teacher_loglik"), ("sorted", "exact_match"))
    ]
    scores = {
        (x["round"], x["eval_set"]): x["score"]
        for x in run.sql("select round, eval_set, score from evals")
    }
    assert run.res.start.scores == {"sorted": scores[0, "sorted"], "loglik": scores[0, "loglik"]}
    (r1,) = run.res.rounds
    assert r1.scores == {"sorted": scores[1, "sorted"], "loglik": scores[1, "loglik"]}
    assert r1.score == scores[1, "loglik"] == run.res.final_score
    ck = run.sql("select round, eval_set, score, is_best from checkpoints order by round")
    best = max((0, 1), key=lambda r: (scores[r, "loglik"], r))
    assert ck == [
        {"round": r, "eval_set": "loglik", "score": scores[r, "loglik"], "is_best": r == best}
        for r in (0, 1)
    ]
    q = "select eval_set, count(*) n from prompts where split = 'eval' group by 1 order by 1"
    assert run.sql(q) == [{"eval_set": "loglik", "n": 16}, {"eval_set": "sorted", "n": 64}]


def test_each_eval_set_is_a_metric_of_the_rounds_mlflow_run(run):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{run.root / 'mlflow.db'}")
    parent = c.get_run(run.res.mlflow_run_id)
    (child,) = c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    m = child.data.metrics
    (r1,) = run.res.rounds
    assert (m["score_sorted"], m["score_loglik"], m["score"]) == (
        r1.scores["sorted"],
        r1.scores["loglik"],
        r1.scores["loglik"],
    )
    assert parent.data.metrics["round_score_sorted"] == r1.scores["sorted"]


def test_npd_status_has_a_column_per_eval_set(run):
    shown = CliRunner().invoke(app, ["status", "sets", "--out", str(run.root), "--json"])
    (got,) = json.loads(shown.stdout)
    assert [(x["round"], x["eval_set"], set(x["scores"])) for x in got["rounds"]] == [
        (0, "loglik", {"sorted", "loglik"}),
        (1, "loglik", {"sorted", "loglik"}),
    ]
    table = CliRunner().invoke(
        app, ["status", "sets", "--out", str(run.root)], env={"COLUMNS": "200"}
    )
    header = next(x for x in table.stdout.splitlines() if "round" in x)
    assert header.split("┃")[1:4] == [" round ", " loglik* ", " sorted "], header


def test_prefect_shows_a_table_per_round_and_a_summary(run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    (flow_run_id,) = [x["flow_run_id"] for x in run.sql("select flow_run_id from runs")]
    only = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(artifact_filter=only)}
    assert set(found) == {"npd-sets-round-1", "npd-sets-summary"}
    table = found["npd-sets-round-1"]
    assert table.type == "table" and table.task_run_id is not None
    rows = {x["result"]: x["value"] for x in json.loads(table.data)}
    (r1,) = run.res.rounds
    assert rows["score loglik (teacher_loglik, primary)"] == round(r1.scores["loglik"], 4)
    assert rows["score sorted (exact_match)"] == round(r1.scores["sorted"], 4)
    assert rows["kept / generated"] == f"{r1.n_kept} / 16" and r1.n_generated == 16
    assert rows["mean loss"] == r1.mean_loss and rows["train tokens"] == r1.train_tokens
    assert {k for k in rows if k.startswith("seconds ")} == {
        f"seconds {s}" for s in ("generate", "score", "filter", "pack", "train", "evaluate")
    }
    assert rows["MLflow run"].startswith("http://127.0.0.1:5000/#/experiments/")
    summary = found["npd-sets-summary"]
    assert summary.type == "markdown"
    assert "| round | sorted | loglik (primary) | kept / generated | loss | seconds |" in (
        summary.data
    )
    assert f"`{MODEL}` version 1" in summary.data


def test_the_best_checkpoint_is_a_registered_transformers_model(run):
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from npd_core.store.lineage import checkpoint

    uri = f"sqlite:///{run.root / 'mlflow.db'}"
    best = checkpoint(run.root, "sets")
    assert run.res.registered == {"name": MODEL, "version": "1"}
    version = MlflowClient(uri).get_model_version(MODEL, "1")
    assert version.run_id == run.res.mlflow_run_id
    assert version.tags == {
        "npd.run_id": "sets",
        "npd.round": str(best.round),
        "npd.eval_set": "loglik",
        "npd.metric": "teacher_loglik",
        "npd.score": str(best.score),
    }
    mlflow.set_tracking_uri(uri)
    pipe = mlflow.transformers.load_model(f"models:/{MODEL}/1")
    weights = AutoModelForCausalLM.from_pretrained(best.path).state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.model.state_dict().items())
    out = pipe("sort ab aa =", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("sort ab aa =")
    # `npd export --register` adds the next version (as each nightly run does)
    exported = CliRunner().invoke(
        app, ["export", "sets", "--register", MODEL, "--out", str(run.root), "--json"]
    )
    assert exported.exit_code == 0, exported.output
    got = json.loads(exported.stdout)
    assert (got["model"], got["version"], got["round"]) == (MODEL, "2", best.round)
