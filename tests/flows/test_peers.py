"""``npd bench --peers trl``: the trl variant runs as its own flow run with its own MLflow run
under the bench's, on the tiny world under a real Prefect server."""

from __future__ import annotations

import importlib.util

import pytest

from flows.headline import BenchContext, Hyper, peer_variant
from npd_core.baselines.peers import INSTALL
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
    assert (variant.name, variant.method, variant.main) == ("trl", "onpolicy", False)
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
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.run_name == "trl"
    assert len(c.get_metric_history(r.mlflow_run_id, "score")) == len(walls)
    assert "trl_settings.json" in [a.path for a in c.list_artifacts(r.mlflow_run_id)]
