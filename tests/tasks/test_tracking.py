"""A new output directory's MLflow database starts as a copy of a migrated template
(tasks/tracking.seed_db): the same schema as MLflow's own, made once per MLflow version, never
over an existing database, and MLflow's own creation where no cache can be written."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from importlib.metadata import version
from pathlib import Path

import pytest

from tasks import tracking


def _schema(db: Path) -> tuple[str, list[str]]:
    with closing(sqlite3.connect(db)) as c:
        (rev,) = c.execute("select version_num from alembic_version").fetchone()
        tables = [r[0] for r in c.execute("select name from sqlite_master where type='table'")]
    return rev, sorted(tables)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "npd" / f"mlflow-{version('mlflow')}.db"


def test_new_output_directories_start_from_one_migrated_template(tmp_path, cache, monkeypatch):
    a, b, own = tmp_path / "a", tmp_path / "b", tmp_path / "own"
    for d in (a, b, own):
        d.mkdir()
    run = tracking.start_run(str(a), "r1", "npd r1", {"rounds": 1})
    assert cache.is_file() and _schema(a / "mlflow.db") == _schema(cache)
    assert tracking.client(a).get_run(run).data.params["rounds"] == "1"
    made = cache.stat().st_mtime_ns
    tracking.start_run(str(b), "r2", "npd r2", {"rounds": 2})
    assert cache.stat().st_mtime_ns == made  # made once, copied since
    # MLflow's own database for the same version has the same schema
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{own / 'mlflow.db'}")
    tracking.client(own).search_experiments()
    assert _schema(own / "mlflow.db") == _schema(b / "mlflow.db")
    assert not list(tmp_path.rglob(".mlflow.db.tmp-*"))


def test_an_existing_database_is_kept(tmp_path, cache):
    run = tracking.start_run(str(tmp_path), "r1", "npd r1", {"rounds": 1})
    cache.unlink()  # a lost cache: the directory's database is still the one it had
    tracking.seed_db(tmp_path / "mlflow.db")
    assert tracking.client(tmp_path).get_run(run).info.run_name == "npd r1"
    assert not cache.exists()


def test_without_a_writable_cache_mlflow_makes_the_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    run = tracking.start_run(str(out), "r1", "npd r1", {"rounds": 1})
    assert tracking.client(out).get_run(run).info.run_name == "npd r1"
    assert _schema(out / "mlflow.db")[1]
