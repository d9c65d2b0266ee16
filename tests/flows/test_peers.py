"""``npd bench --peers trl``: the trl variant runs as its own flow run with its own MLflow run
under the bench's, on the tiny world under a real Prefect server; through the CLI it runs
``--seeds`` seeds with onpolicy's chosen hyperparameters and lands in the bench JSON."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.variants import peer_variant
from npd_core.baselines.peers import INSTALL
from npd_core.bench.harness import Hyper
from npd_core.bench.plan import BenchContext
from npd_core.config import NPDConfig
from npd_core.store import Store
from tasks import tracking

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(
        importlib.util.find_spec("trl") is None, reason=f"needs the peers extra (TRL): {INSTALL}"
    ),
]


def test_trl_variant_runs_on_the_clock_under_the_bench_run(
    tmp_path, tiny_world, prefect_server, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Store(tmp_path)
    parent = tracking.start_run(str(tmp_path), "bench-t", "bench", {})
    keys = ("teacher", "student", "train_prompts", "eval_prompts")
    cfg = NPDConfig.model_validate({"threads": 1, "data": {"eval_size": 16}})
    ctx = BenchContext(
        tmp_path,
        "bench-t",
        {k: str(getattr(tiny_world, k)) for k in keys},
        cfg.model_dump(mode="json"),
        2.0,
        [1.0, 2.0],
        parent,
        lambda m: None,
    )
    variant = peer_variant("trl")
    assert (variant.name, variant.method, variant.main) == ("trl", "onpolicy", True)
    r = variant.run(ctx, 0, Hyper(lr=2e-3, rows_per_step=4, prompts_per_step=8))
    walls = [p["wall_s"] for p in r.curve]
    assert walls[0] == 0 and walls == sorted(walls) and 2 <= len(walls) <= 3
    assert 2.0 <= r.wall_s == walls[-1]
    s = r.settings
    assert (s["learning_rate"], s["per_device_train_batch_size"], s["prompts_per_step"]) == (
        2e-3,
        8,
        8,
    )
    assert s["optimizer_steps"] >= 1 and r.generated_tokens >= 8 * s["optimizer_steps"]
    c = tracking.client(tmp_path)
    run = c.get_run(r.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.run_name == "trl-s0"
    assert len(c.get_metric_history(r.mlflow_run_id, "score")) == len(walls)
    assert "trl_settings.json" in [a.path for a in c.list_artifacts(r.mlflow_run_id)]


def test_bench_peers_trl_runs_each_seed_with_onpolicys_choice(
    tmp_path, tiny_world, prefect_server, monkeypatch
):
    """``npd bench --quick --seeds 2 --variants onpolicy --peers trl``: trl, a main variant, runs
    2 seeds as onpolicy does, with the hyperparameters chosen for onpolicy, under the bench run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # prefect_env's changes are undone
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "threads": 1,
                "models": {"teacher": str(tiny_world.teacher), "student": str(tiny_world.student)},
                "data": {
                    "prompts": str(tiny_world.train_prompts),
                    "eval_prompts": str(tiny_world.eval_prompts),
                    "eval_size": 16,
                },
                "generate": {"max_new_tokens": 24},
                "train": {"rows_per_step": 4, "warmup_steps": 1},
                "pack": {"max_seq_len": 128},
            }
        )
    )
    out = tmp_path / "out"
    args = ["bench", "--quick", "--json", "--seeds", "2", "--budget-s", "8"]
    args += ["--variants", "onpolicy", "--peers", "trl", "--config", str(cfg), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert set(rep["variants"]) == {"onpolicy", "trl"}
    assert rep["seeds"] == {"onpolicy": 2, "trl": 2}
    trl, chosen = rep["variants"]["trl"], rep["grid"]["chosen"]["onpolicy"]
    assert trl["method"] == "onpolicy" and trl["hyperparameters"] == chosen
    assert trl["curve"][0]["wall_s"] == 0.0 and trl["final_score"] == trl["curve"][-1]["score"]
    assert trl["generated_tokens"] > 0 and trl["train_tokens"] > trl["generated_tokens"]
    c = tracking.client(out)
    parent = c.get_run(rep["mlflow_run_id"])
    kids = c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{rep['mlflow_run_id']}'"
    )
    names = sorted(k.info.run_name for k in kids)
    assert names == ["onpolicy-s0", "onpolicy-s1", "trl-s0", "trl-s1"]
