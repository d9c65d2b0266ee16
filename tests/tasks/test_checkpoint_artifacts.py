"""A round's checkpoint logged to a local MLflow store is hard-linked, not copied (no second
copy of the weights on disk), MLflow lists it like any artifact, a retried round replaces it,
and where no link can be made MLflow copies it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from npd_core.models import TRAINER_STATE
from tasks import tracking


@pytest.fixture
def logged(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    ck = out / "checkpoints" / "round=1"
    ck.mkdir(parents=True)
    for name, body in (("model.safetensors", b"w" * 4096), ("config.json", b"{}")):
        (ck / name).write_bytes(body)
    (ck / TRAINER_STATE).write_bytes(b"o" * 8192)
    run = tracking.start_run(str(out), "r", "r", {})
    c = tracking.client(out)
    return out, ck, run, c


def _artifacts(c, run) -> dict[str, Path]:
    base = Path(c.get_run(run).info.artifact_uri.removeprefix("file://"))
    return {a.path: base / a.path for a in c.list_artifacts(run, "checkpoint/round=1")}


def test_weights_are_linked_and_listed_and_the_optimizer_state_is_not(logged):
    out, ck, run, c = logged
    tracking.log_checkpoint(str(out), run, ck, "checkpoint/round=1")
    arts = _artifacts(c, run)
    assert sorted(arts) == [
        "checkpoint/round=1/config.json",
        "checkpoint/round=1/model.safetensors",
    ]
    for path in arts.values():
        src = ck / path.name
        assert os.stat(path).st_ino == os.stat(src).st_ino and os.stat(src).st_nlink == 2


def test_a_retried_round_replaces_its_artifacts(logged):
    out, ck, run, c = logged
    tracking.log_checkpoint(str(out), run, ck, "checkpoint/round=1")
    (ck / "model.safetensors").unlink()  # the retry writes a new file, as save_checkpoint does
    (ck / "model.safetensors").write_bytes(b"v" * 4096)
    tracking.log_checkpoint(str(out), run, ck, "checkpoint/round=1")
    arts = _artifacts(c, run)
    assert arts["checkpoint/round=1/model.safetensors"].read_bytes() == b"v" * 4096
    assert not any(
        p.name.startswith(".") for p in arts["checkpoint/round=1/config.json"].parent.iterdir()
    )


def test_without_hard_links_mlflow_copies(logged, monkeypatch):
    out, ck, run, c = logged

    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(tracking.os, "link", refuse)
    tracking.log_checkpoint(str(out), run, ck, "checkpoint/round=1")
    arts = _artifacts(c, run)
    weights = arts["checkpoint/round=1/model.safetensors"]
    assert weights.read_bytes() == b"w" * 4096
    assert os.stat(weights).st_ino != os.stat(ck / "model.safetensors").st_ino
