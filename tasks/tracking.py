"""MLflow bookkeeping of a run: one parent run per NPD run, one nested run per round.

``MlflowClient`` with explicit run ids (not the fluent API), because stages of two rounds log
from two threads at once and the fluent "active run" is thread-local state.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
import threading
from contextlib import closing
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from npd_core.atomic import atomic_file
from npd_core.store.lineage import Checkpoint

EXPERIMENT = "npd"
DB = "mlflow.db"  # in the output directory, unless MLFLOW_TRACKING_URI says otherwise


def tracking_uri(out: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else sqlite in the output directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve() / DB}"


def client(out: str | Path) -> MlflowClient:
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        seed_db(Path(out).resolve() / DB)
    return MlflowClient(tracking_uri=tracking_uri(out))


def cache_dir() -> Path:
    """npd's folder in the user's cache (``$XDG_CACHE_HOME/npd``, else ``~/.cache/npd``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npd"


def seed_db(db: Path) -> None:
    """Start a new output directory's MLflow database as a copy of an empty, migrated one.

    MLflow makes a database by running each of its schema migrations in turn: about 3 s of CPU
    here, paid by every new output directory. The migrated template is made once per MLflow
    version in :func:`cache_dir`; where that folder cannot be written, MLflow makes the
    database itself, as before. The copy is linked into place, so it never replaces a database
    that another thread or process has just made."""
    if db.exists() or not db.parent.is_dir():
        return
    template = cache_dir() / f"mlflow-{version('mlflow')}.db"
    try:
        if not template.is_file():
            template.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=template.parent) as d, atomic_file(template) as t:
                made = Path(d) / DB
                MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments()
                copy_db(made, t)
        tmp = db.with_name(f".{DB}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            copy_db(template, tmp)
            os.link(tmp, db)
        finally:
            tmp.unlink(missing_ok=True)
    except FileExistsError:
        pass  # made meanwhile by another thread or process
    except OSError:
        pass  # no cache here: MLflow migrates a new database itself


def copy_db(src: Path, dest: Path) -> None:
    """A consistent copy of a SQLite database, live or not (its backup API, not a file copy)."""
    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(dest)) as b:
        a.backup(b)


def _experiment(c: MlflowClient, out: str | Path) -> str:
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    art = (Path(out).resolve() / "mlartifacts").as_uri()
    return c.create_experiment(EXPERIMENT, artifact_location=art)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    """The commit npd runs from (tagged on every MLflow run), "unknown" outside a checkout."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(out: str, run_id: str, name: str, config: dict[str, Any]) -> str:
    """Create the parent MLflow run: params = full config, tags = commit and versions."""
    c = client(out)
    exp = _experiment(c, out)
    query = f"tags.`npd.run_id` = '{run_id}' and attributes.run_name = '{name}'"
    found = c.search_runs([exp], query)
    if found:  # a retried flow run continues its MLflow run
        return found[0].info.run_id
    tags = {"npd.run_id": run_id, "git_commit": git_commit(), "mlflow.runName": name}
    for pkg in ("npd", "torch", "transformers", "prefect", "mlflow", "duckdb"):
        tags[f"version.{pkg}"] = version(pkg)
    run = c.create_run(exp, tags=tags, run_name=name)
    params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(config).items())]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as d:
        import yaml

        p = Path(d) / "config.yaml"
        p.write_text(yaml.safe_dump(config, sort_keys=False))
        c.log_artifact(run.info.run_id, str(p))
    return run.info.run_id


def log_figures(experiment: str, name: str, figures: dict[str, Any], knobs: dict[str, Any]) -> str:
    """A bench with no output directory as one finished run of ``experiment`` on the tracking
    URI the environment names: params = ``knobs``, metrics = the numeric figures (nested keys
    dotted), tags = the text figures and the git commit, the whole as ``bench_<name>.json``.
    The URI is read from the environment here, not from MLflow's process-wide setting, which
    another run in the same process may have set."""
    c = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"))
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    tags = {"mlflow.runName": name, "git_commit": git_commit()}
    tags.update({f"bench.{k}": v for k, v in figures.items() if isinstance(v, str)})
    run = c.create_run(exp_id, tags=tags)
    rid, ts = run.info.run_id, int(run.info.start_time)
    numbers = {k: v for k, v in flatten(figures).items() if isinstance(v, int | float)}
    c.log_batch(
        rid,
        metrics=[Metric(k, float(v), ts, 0) for k, v in numbers.items() if not isinstance(v, bool)],
        params=[Param(k, str(v)) for k, v in knobs.items()],
    )
    c.log_dict(rid, figures, f"bench_{name}.json")
    c.set_terminated(rid)
    return rid


def round_run(out: str, parent: str, run_id: str, r: int) -> str:
    """The nested run of round ``r`` (created once; found again by tag on a retry)."""
    c = client(out)
    exp = c.get_run(parent).info.experiment_id
    found = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' and tags.npd.round = '{r}'")
    if found:
        return found[0].info.run_id
    run = c.create_run(
        exp,
        run_name=f"round {r}",
        tags={"mlflow.parentRunId": parent, "npd.round": str(r), "npd.run_id": run_id},
    )
    return run.info.run_id


def log_metrics(out: str, run: str, values: dict[str, float], step: int = 0) -> None:
    import time

    now = int(time.time() * 1000)
    ms = [
        Metric(k, float(v), now, step)
        for k, v in values.items()
        if isinstance(v, int | float) and v == v
    ]
    for i in range(0, len(ms), 500):
        client(out).log_batch(run, metrics=ms[i : i + 500])


def log_steps(out: str, run: str, log: list[dict[str, Any]]) -> None:
    """Per-optimizer-step loss, lr and tokens/s, batched into few calls."""
    import time

    now = int(time.time() * 1000)
    ms = [
        Metric(k, float(e[k]), now, int(e["step"]))
        for e in log
        for k in ("loss", "lr", "tokens_per_s")
    ]
    for i in range(0, len(ms), 900):
        client(out).log_batch(run, metrics=ms[i : i + 900])


def log_artifact(out: str, run: str, path: str | Path, subdir: str | None = None) -> None:
    p = Path(path)
    c = client(out)
    if p.is_dir():
        c.log_artifacts(run, str(p), subdir)
    else:
        c.log_artifact(run, str(p), subdir)


def log_checkpoint(out: str, run: str, path: str | Path, subdir: str) -> None:
    """A round's checkpoint as artifacts: weights, config and tokenizer, not its optimizer
    state (twice the weights; only the next round's training reads it, from the output
    directory, and ``retention.prune`` keeps the latest round's only).

    On a local artifact store each file is hard-linked, not copied: a checkpoint is written
    once and never changed in place, so the link costs no disk (a 135 M model's checkpoint is
    0.5 GB a round). Elsewhere, or where a link cannot be made, MLflow copies it."""
    from npd_core.models import TRAINER_STATE  # torch: only where a checkpoint is logged

    c = client(out)
    local = _local_artifact_dir(c, run)
    for f in sorted(Path(path).iterdir()):
        if not f.is_file() or f.name == TRAINER_STATE:
            continue
        if local is None or not _linked(f, local / subdir / f.name):
            c.log_artifact(run, str(f), subdir)


def _local_artifact_dir(c: MlflowClient, run: str) -> Path | None:
    """The run's artifact folder when the artifact store is this machine's file system."""
    uri = urlparse(c.get_run(run).info.artifact_uri)
    if uri.scheme not in ("", "file"):
        return None
    return Path(url2pathname(uri.path))


def _linked(src: Path, dest: Path) -> bool:
    """Hard-link ``src`` at ``dest`` (an earlier attempt's file there is replaced); False where
    the file system refuses (another device, no hard links)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.samefile(src):  # rename() onto a link of itself does nothing
        return True
    tmp = dest.with_name(f".{dest.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        return False
    os.replace(tmp, dest)
    return True


def end_run(out: str, run: str, status: str = "FINISHED") -> None:
    client(out).set_terminated(run, status=status)


UI_DEFAULT = "http://127.0.0.1:5000"  # what `npd ui` serves MLflow's UI on


def run_url(out: str | Path, run: str, ui_url: str | None = None) -> str:
    """The MLflow UI page of ``run``: under ``ui_url``, else the tracking server when the
    tracking URI is one (it serves the UI), else ``npd ui``'s address."""
    uri = tracking_uri(out)
    base = ui_url or (uri if uri.startswith(("http://", "https://")) else UI_DEFAULT)
    exp = client(out).get_run(run).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{exp}/runs/{run}"


def register_checkpoint(out: str | Path, run: str, name: str, ck: Checkpoint) -> str:
    """Add checkpoint ``ck`` to the Model Registry as a new version of model ``name``: a
    transformers text-generation model with its tokenizer, logged to MLflow run ``run`` and
    tagged with its run id, round, eval set, metric and score; returns the version. The model
    and tokenizer are loaded and logged, so the trainer state beside them stays out."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = client(out)
    # the fluent API writes the files: point it at this store and at the run's experiment
    mlflow.set_tracking_uri(tracking_uri(out))
    mlflow.set_experiment(experiment_id=c.get_run(run).info.experiment_id)
    parts = {
        "model": AutoModelForCausalLM.from_pretrained(ck.path),
        "tokenizer": AutoTokenizer.from_pretrained(ck.path),
    }
    info = mlflow.transformers.log_model(
        parts,
        name="model",
        task="text-generation",
        registered_model_name=name,
        run_id=run,
        pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("transformers", "torch")],
    )
    v = str(info.registered_model_version)
    tags = {"run_id": ck.run_id, "round": ck.round, "eval_set": ck.eval_set}
    tags |= {"metric": ck.metric, "score": ck.score}
    for k, value in tags.items():
        c.set_model_version_tag(name, v, f"npd.{k}", str(value))
    return v
