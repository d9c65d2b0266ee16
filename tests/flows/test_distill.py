"""End to end: the distill flow on tiny models under a real (test) Prefect server."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from npd_core.config import NPDConfig, TrainConfig
from npd_core.method.optim import lr_at
from npd_core.pipeline.results import RunSummary
from npd_core.pipeline.spec import RunSpec
from npd_core.store import Store, query

CFG = dict(
    rounds=2,
    threads=1,  # tiny models: a second thread per stage only waits on a busy box
    data={"prompts_per_round": 48, "eval_size": 32},
    generate={"max_new_tokens": 32},
    train={"steps_per_round": 3, "rows_per_step": 4, "epochs_per_round": 10},
    pack={"max_seq_len": 128},
    eval={"batch_size": 64},
    # the Δ-IFD band, so that every view, the filter's histogram and its dropped KL mass are
    # exercised end to end (the default, rule none, is the lean path of test_stages)
    filter={"rule": "band", "drop_unfinished": True},
)


def _run(tmp_path, world, run_id, **over):
    from flows.distill import distill_flow

    cfg = NPDConfig.model_validate({**CFG, **over})
    Store(tmp_path)
    spec = RunSpec(
        str(tmp_path),
        run_id,
        cfg.model_dump(mode="json"),
        str(world.teacher),
        str(world.student),
        str(world.train_prompts),
        str(world.eval_prompts),
    )
    return spec, distill_flow(spec)


E2E_ROUNDS = 3  # round 3 learns from D_3, made by θ_1 while θ_2 trains (staleness 1, overlap)


@dataclass
class E2E:
    spec: RunSpec
    res: RunSummary
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "npd.duckdb"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_world, prefect_server) -> E2E:
    """One run of the distill flow (overlap on, the default) that the tests below read."""
    root = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        spec, res = _run(root, tiny_world, "e2e", rounds=E2E_ROUNDS)
    return E2E(spec, res, root)


def test_every_rounds_samples_are_stored_with_their_provenance(e2e, tiny_world):
    rows = query(
        e2e.db,
        "select round, count(*) n, count(distinct flow_run_id) f, "
        "min(task_run_id) t, min(backend) b, min(generator_checkpoint) g "
        "from samples group by round order by round",
    ).to_pylist()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["n"] == 48 and r["f"] == 1 and r["t"] and r["b"] == "hf" for r in rows)
    # staleness 1: D_1 and D_2 both come from θ_0, the initial student; D_3 from θ_1
    assert rows[0]["g"] == rows[1]["g"] == str(tiny_world.student.resolve())
    theta_1 = query(e2e.db, "select path from checkpoints where round = 1").column(0)[0]
    assert rows[2]["g"] == theta_1.as_py()


def test_every_view_is_filled_and_the_run_completed(e2e):
    counts = query(
        e2e.db,
        "select (select count(*) from samples where delta_ifd is null) nulls, "
        "(select count(*) from filtered) kept, "
        "(select count(*) from samples where not kept and filter_reason is null) bad, "
        "(select count(*) from rounds) rounds, (select count(*) from evals) evals, "
        "(select count(*) from checkpoints) ckpts, "
        "(select status from runs) status",
    ).to_pylist()[0]
    assert counts["nulls"] == 0 and counts["bad"] == 0 and counts["kept"] > 0
    assert counts["rounds"] == 3 and counts["evals"] == 4 and counts["ckpts"] == 4  # θ_0 too
    assert counts["status"] == "completed"
    assert [r.score for r in e2e.res.rounds] == query(
        e2e.db, "select score from evals where round > 0 order by round"
    ).column("score").to_pylist()
    stage_s = json.loads(
        query(e2e.db, "select stage_seconds_json from rounds where round = 1").column(0)[0].as_py()
    )
    assert set(stage_s) == {"generate", "score", "filter", "pack", "train", "evaluate"}
    filt = query(e2e.db, "select filter_rule, dropped_kl_share from rounds").to_pylist()
    assert all(r["filter_rule"] == "band" and 0 < r["dropped_kl_share"] < 1 for r in filt)


def test_npd_run_json_reports_each_stages_peak_rss(e2e):
    """``peak_rss_mib``: per stage, the peak RSS of this process (torch, Prefect and the tiny
    models: hundreds of MiB) during that stage, the largest over the rounds."""
    got = replace(e2e.res, launched=0.0, returned=1.0).to_json()["peak_rss_mib"]
    assert list(got) == ["generate", "score", "filter", "pack", "train", "evaluate"]
    assert all(100 < mib < 8192 for mib in got.values()), got


def test_junk_bench_rates_every_score_on_the_runs_checkpoints(e2e):
    """``npd bench filter --stage junk`` on θ_1, θ_2 (learners θ_2, θ_3): each score's AUROC is
    a probability for every junk kind, the looping samples (never finished) are found by the
    unfinished flag at least by chance, and the summary's mean is over the rounds."""
    from npd_core.bench.junk import FLAGS, KINDS, run_junk

    res = run_junk(str(e2e.root), "e2e", (1, 2), n=40, log=lambda m: None)
    rows = [res["rounds"][k] for k in ("1", "2")]
    for row in rows:
        assert set(row) == set(FLAGS)
        assert all(0 <= row[s][kind] <= 1 for s in FLAGS for kind in KINDS)
        assert row["unfinished"]["loop"] >= 0.5
    for s in FLAGS:
        got = res["summary"][s]["all"]
        assert got["mean"] == pytest.approx((rows[0][s]["all"] + rows[1][s]["all"]) / 2)
        assert got["ci95"][0] <= got["mean"] <= got["ci95"][1]


def test_ifd_views_bench_samples_the_runs_checkpoints(e2e):
    """Every candidate view's tokens are what the tokenizer gives, each ρ is a correlation,
    the mean is over the checkpoints and the best is the largest mean."""
    from npd_core.bench.ifd_views import GENERIC_INSTRUCTION, run_views
    from npd_core.models import load_tokenizer

    res = run_views(str(e2e.root), "e2e", (1, 3), n=24, texts=["12,34="], log=lambda m: None)
    tok = load_tokenizer(e2e.spec.teacher)
    want = {
        "bos": [tok.bos_token_id],
        "eos": [tok.eos_token_id],
        "empty_turn": tok("")["input_ids"] or [tok.bos_token_id],
        "generic_instruction": tok(GENERIC_INSTRUCTION)["input_ids"],
        "text:12,34=": tok("12,34=")["input_ids"],
    }
    rows = [res["checkpoints"][k] for k in ("1", "3")]
    for row in rows:
        assert 3 < row["samples"] <= 24 and row["mean_kl_per_token"] > 0
        assert {k: row[k]["view_tokens"] for k in want} == want
        assert all(-1 <= row[k]["spearman"] <= 1 for k in want)
    for k in want:
        mean = (rows[0][k]["spearman"] + rows[1][k]["spearman"]) / 2
        assert res["mean_spearman"][k] == pytest.approx(mean)
    assert res["best"] == max(res["mean_spearman"], key=res["mean_spearman"].get)


def test_the_last_checkpoint_loads_with_transformers_and_holds_the_optimizer(e2e):
    path = query(e2e.db, "select path from checkpoints where round = 3").column(0)[0].as_py()
    model = AutoModelForCausalLM.from_pretrained(e2e.root / path)
    assert model.config.model_type == "qwen2"
    state = torch.load(e2e.root / path / "trainer_state.pt", weights_only=False)
    assert state["step"] == 9 and "optimizer" in state and "rng" in state


def test_mlflow_has_the_run_a_nested_run_per_round_and_the_artifacts(e2e):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{e2e.root / 'mlflow.db'}")
    parent = c.get_run(e2e.res.mlflow_run_id)
    assert parent.data.params["rounds"] == "3" and parent.data.tags["git_commit"]
    assert parent.data.metrics["final_score"] == e2e.res.final_score
    children = c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["npd.round"] for r in children) == ["1", "2", "3"]
    child = next(r for r in children if r.data.tags["npd.round"] == "2")
    names = {a.path for a in c.list_artifacts(child.info.run_id)}
    assert {"plots", "checkpoint"} <= names
    assert [a.path for a in c.list_artifacts(child.info.run_id, "plots")] == [
        "plots/delta_ifd_r2.png"
    ]
    assert 0 < child.data.metrics["dropped_kl_share"] < 1
    assert len(c.get_metric_history(child.info.run_id, "loss")) == 3
    assert "config.yaml" in {a.path for a in c.list_artifacts(parent.info.run_id)}


def test_npd_status_reads_the_same_store(e2e):
    from typer.testing import CliRunner

    from flows.cli import app

    shown = CliRunner().invoke(app, ["status", "e2e", "--out", str(e2e.root), "--json"])
    (run,) = json.loads(shown.stdout)
    assert run["status"] == "completed" and [x["round"] for x in run["rounds"]] == [0, 1, 2, 3]
    missing = CliRunner().invoke(app, ["status", "nope", "--out", str(e2e.root)])
    assert missing.exit_code != 0 and "no run 'nope'" in str(missing.exception)


def test_lr_cosine_ends_with_the_last_round_when_epochs_bound_the_steps(
    tmp_path, tiny_world, prefect_server, monkeypatch
):
    """One pass over each round's rows comes long before 1000 steps: the schedule's horizon
    follows the steps actually taken, so the last step ends the cosine, not its first tenth."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train = {"steps_per_round": 1000, "rows_per_step": 2, "epochs_per_round": 1.0}
    train |= {"warmup_steps": 1, "lr": 1e-3, "min_lr_ratio": 0.1}
    spec, res = _run(tmp_path, tiny_world, "horizon", train=train)
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    kids = c.search_runs(
        [c.get_run(res.mlflow_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'",
    )
    lrs = [
        m.value
        for k in sorted(kids, key=lambda k: int(k.data.tags["npd.round"]))
        for m in sorted(c.get_metric_history(k.info.run_id, "lr"), key=lambda m: m.step)
    ]
    steps = query(tmp_path / "npd.duckdb", "select max(step) from checkpoints").column(0)[0]
    n = steps.as_py()
    assert 4 <= len(lrs) == n < 1000
    # the last step is the horizon's last: near the floor (1e-4), not at 2000 steps' start
    assert lrs[-1] == pytest.approx(lr_at(n - 1, TrainConfig(**train), n))
    assert lrs[-1] < 5e-4
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # decays after warmup


SAMPLE_COLS = (
    "round, prompt_id, sample_idx, response, response_token_ids, finished, "
    "sample_logprob_sum, delta_ifd, kept, filter_reason, teacher_logprob_sum"
)


@pytest.mark.slow
def test_overlap_equals_strict_order(e2e, tmp_path, tiny_world, prefect_server):
    """staleness 1 with overlap (the module's run) and the same run strictly in order: identical
    tables and weights."""
    strict, _ = _run(tmp_path, tiny_world, "strict", rounds=E2E_ROUNDS, overlap=False)
    q = f"select {SAMPLE_COLS} from samples order by round, prompt_id, sample_idx"
    ta, tb = query(e2e.db, q), query(tmp_path / "npd.duckdb", q)
    assert ta.num_rows == 3 * 48 and ta.equals(tb)
    for r in (1, 2, 3):
        wa = load_file(f"{e2e.spec.checkpoint(r)}/model.safetensors")
        wb = load_file(f"{strict.checkpoint(r)}/model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _as_dict_results(results: Path) -> int:
    """Rewrite every stage result Prefect persisted under ``results`` as npd persisted it
    before typed results (a dict, ``io_spans`` inside its metrics); how many it rewrote."""
    n = 0
    for path in (p for p in results.rglob("*") if p.is_file()):
        try:  # other results are pickled (a flow's, a task's without a JSON serializer)
            record = json.loads(path.read_bytes())
            value = json.loads(record["result"])
        except (ValueError, TypeError, KeyError):
            continue
        if not (isinstance(value, dict) and value.get("__class__", "").endswith(".StageResult")):
            continue
        old = value["data"]
        old["metrics"]["io_spans"] = old.pop("io_spans")
        path.write_text(json.dumps(record | {"result": json.dumps(old)}))
        n += 1
    return n


@pytest.mark.parametrize("stage", ["generate", "train"])
def test_injected_failure_then_rerun_resumes_from_cache(
    tmp_path, tiny_world, prefect_server, monkeypatch, stage
):
    """NPD_FAIL_AT fails round 2 once; the same run again finds round 1 cached, ends complete.
    The results of the first attempt are rewritten as an older npd persisted them (dicts): a
    run begun before typed results resumes the same way."""
    monkeypatch.setenv("NPD_FAIL_AT", f"{stage}:2")
    with pytest.raises(Exception, match="injected failure"):
        _run(tmp_path, tiny_world, f"fail-{stage}")
    assert _as_dict_results(Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])) >= 5
    db = tmp_path / "npd.duckdb"
    q = "select round, min(created_at) t, count(*) n from samples group by round order by round"
    before = query(db, q).to_pylist()
    spec, res = _run(tmp_path, tiny_world, f"fail-{stage}")  # what `npd retry` does
    after = query(db, q).to_pylist()
    assert after[0] == before[0]  # round 1's samples were not regenerated (cached stage)
    assert [r["n"] for r in after] == [48, 48] and res.rounds[-1].round == 2
    assert {("generate", 1), ("train", 1), ("evaluate", 1)} <= set(res.reused_stages)
    status = query(db, "select status from runs").column(0).to_pylist()
    assert status == ["completed"]


def test_evaluation_at_the_end_is_off_the_learners_path_and_changes_nothing(
    e2e, tmp_path, tiny_world, prefect_server
):
    """eval.when: end (the bench's setting): no evaluation starts before the last round is
    trained, and the run's samples, weights and scores are those of per-round evaluation."""
    spec, res = _run(tmp_path, tiny_world, "at-end", rounds=E2E_ROUNDS, eval={"when": "end"})
    last_train = max(e for stage, _, _, e in res.stage_intervals if stage == "train")
    evals = sorted((s, r) for stage, r, s, _ in res.stage_intervals if stage == "evaluate")
    assert [r for _, r in evals] == [0, 1, 2, 3] and evals[0][0] >= last_train
    q = f"select {SAMPLE_COLS} from samples order by round, prompt_id, sample_idx"
    assert query(e2e.db, q).equals(query(tmp_path / "npd.duckdb", q))
    for r in (1, 2, 3):
        wa = load_file(f"{e2e.spec.checkpoint(r)}/model.safetensors")
        wb = load_file(f"{spec.checkpoint(r)}/model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [x.score for x in res.rounds] == [x.score for x in e2e.res.rounds]
