"""``npd bench packing`` logs its figures to MLflow through ``tasks.tracking.log_figures`` when
``MLFLOW_TRACKING_URI`` names a server: one finished run per call."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tasks.tracking import log_figures


def test_log_figures_writes_params_numeric_metrics_text_tags_and_the_json(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a new experiment keeps its artifacts in ./mlruns
    figures = {"speedup": 2.5, "steps": 3, "ok": True, "kernel": "sdpa", "mfu": {"packed": 0.1}}
    figures["none"] = None
    rid = log_figures("npd-bench", "packing", figures, {"n_samples": 8, "device": "cpu"})
    run = MlflowClient(uri).get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == "packing"
    assert run.data.metrics == {"speedup": 2.5, "steps": 3.0, "mfu.packed": 0.1}
    assert run.data.params == {"n_samples": "8", "device": "cpu"}
    assert run.data.tags["bench.kernel"] == "sdpa" and run.data.tags["git_commit"]
    (art,) = MlflowClient(uri).list_artifacts(rid)
    assert art.path == "bench_packing.json"
