"""The ``npd`` command (typer + rich). It only fills in the config and calls the flows.

Everything for humans goes to stderr; with ``--json`` stdout holds exactly one JSON object.
User errors print one ``error:`` line and exit non-zero (2 for usage/config); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import csv
import inspect
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from flows.bench import bench_app
from flows.env import DEBUG, finite, prefect_env
from flows.models import models_app
from flows.options import JsonOpt, OutOpt
from npd_core.errors import ConfigError, NPDError, StoreUsageError, TrainingError, disk_full
from npd_core.pipeline.results import RunSummary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Near-Policy Distillation as a scheduled Prefect pipeline.",
)
config_app = typer.Typer(no_args_is_help=True, help="Write or inspect a config file.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
err = Console(stderr=True)
RUN: dict[str, str] = {}  # the run this command started or resumed (for the resume hint)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    DEBUG["on"] = debug


class Bars:
    """rich progress bars on stderr, fed by the stages through ``tasks.progress``."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<14}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=not enabled,
            transient=False,
        )

    def __call__(self, stage: str, r: int, total: int):
        return self.phase(f"r{r} {stage}", total)

    def phase(self, description: str, total: int):
        """A bar of ``total`` steps; returns its ``advance`` (also an embedded world's build
        progress, ``npd_core.toy.world.BuildProgress``)."""
        task = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(task, n)


def run_flow(spec_kwargs: dict[str, Any], out: Path, show: bool) -> RunSummary:
    """Run the distill flow; its summary knows when it was launched and returned."""
    prefect_env(out)
    from flows.distill import distill_flow
    from npd_core.pipeline.spec import RunSpec
    from tasks import progress

    spec = RunSpec(**spec_kwargs)
    RUN.update(run_id=spec.run_id, out=str(out))
    bars = Bars(show)
    progress.reporter = bars
    t0 = time.time()
    with bars.progress:
        res = distill_flow(spec)
    return replace(res, launched=t0, returned=time.time())


OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="config overrides, key=value with a dotted key and a YAML value: train.lr=2e-5",
        show_default=False,
    ),
]


def _score_columns(sets: list[str], primary: str) -> list[str]:
    """One score column per eval set (the primary one starred), or "score" for the one set."""
    return ["score"] if len(sets) == 1 else [f"{n}*" if n == primary else n for n in sets]


def print_summary(res: RunSummary) -> None:
    summary = res.to_json()  # its rounded timings
    t = Table(title=f"npd run {res.run_id}", title_justify="left")
    sets = list(res.start.scores)
    for col in ("round", "generated", "kept", "train tok", "loss"):
        t.add_column(col, justify="right")
    for col in (*_score_columns(sets, res.primary_set), "seconds"):
        t.add_column(col, justify="right")
    t.add_row("0", "", "", "", "", *(f"{res.start.scores[n]:.1f}" for n in sets), "")
    for r in res.rounds:
        t.add_row(
            str(r.round),
            str(r.n_generated),
            str(r.n_kept),
            str(r.train_tokens),
            f"{r.mean_loss:.4f}",
            *(f"{r.scores[n]:.1f}" for n in sets),
            f"{sum(r.stage_seconds.values()):.1f}",
        )
    err.print(t)
    if res.reused_stages:
        from tasks.artifacts import reused_text

        err.print(f"reused from an earlier process's cache: {reused_text(res.reused_stages)}")
    if reg := res.registered:
        err.print(f"registered in the MLflow Model Registry: {reg['name']} v{reg['version']}")
    err.print(
        f"score {res.start_score:.1f} → {res.final_score:.1f} "
        f"({summary['gain_points']:+.1f} points) in {summary['wall_s']:.0f} s; "
        f"orchestration overhead {summary['overhead_s']:.1f} s "
        f"({100 * summary['overhead_fraction']:.1f}% of rounds), "
        f"startup {summary['startup_s']:.1f} s"
    )
    err.print(
        f'query:  npd sql "select round, count(*), avg(delta_ifd) from samples group by round"'
        f" --db {res.db}"
    )
    err.print(f"MLflow: mlflow ui --backend-store-uri {res.mlflow_uri}")


def emit(summary: RunSummary, as_json: bool) -> None:
    for r in summary.rounds:
        if r.n_kept == 0:
            reasons = ", ".join(f"{k}: {n}" for k, n in sorted(r.drop_reasons.items()))
            err.print(
                f"warning: round {r.round} kept none of its {r.n_generated} samples "
                f"({reasons}; filter_reason in `samples`); training skipped it, the run went on",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    if as_json:
        out = finite(summary.to_json())
        sys.stdout.write(json.dumps(out, default=str, allow_nan=False) + "\n")
    else:
        print_summary(summary)


@app.command()
def demo(
    out: OutOpt = Path("npd-out"),
    rounds: Annotated[
        int | None, typer.Option(help="distillation rounds (default: config)")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML overriding defaults")
    ] = None,
    world: Annotated[
        str,
        typer.Option(
            "--world",
            help="embedded world: toy (short sorted lists), long (selection-sort traces, "
            "graded on their final line), views (eight views of a list, graded per line) or "
            "smol (SmolLM2-135M-Instruct and a pruned student; `make smol` first)",
        ),
    ] = "toy",
    as_json: JsonOpt = False,
    overrides: OverridesArg = None,
) -> None:
    """Build (or reuse) an embedded world and distill its student for a few rounds
    (key=value pairs override the config: npd demo train.lr=2e-3)."""
    from npd_core.config import load_config
    from npd_core.config.overrides import parse_overrides

    cfg = load_config(config, parse_overrides(overrides or [], rounds=rounds))
    # after the config: a bad one fails before torch loads
    from npd_core.pipeline.resolve import new_run_id, resolve_spec

    build = Bars(True)
    with build.progress:
        spec, built = resolve_spec(
            cfg, out, new_run_id(), log=err.print, world=world, progress=build.phase
        )
    if built is not None:
        err.print(
            f"{world} world: teacher {built.teacher_score:.1f}, student "
            f"{built.student_score:.1f} held-out {cfg.eval.metric} match ({built.root})"
        )
    err.print(f"run {spec['run_id']}: {cfg.rounds} rounds, staleness {cfg.staleness}")
    emit(run_flow(spec, out, show=True), as_json)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    overrides: OverridesArg = None,
    out: OutOpt = Path("npd-out"),
    as_json: JsonOpt = False,
) -> None:
    """Distill a teacher/student pair (HF folders or GGUF files) on your prompts (JSONL, Parquet
    or a datasets folder; plain or conversational), as the config says; key=value pairs
    override it: npd run run.yaml train.lr=2e-5 rounds=5."""
    from npd_core.config import load_config
    from npd_core.config.overrides import parse_overrides

    # before torch and transformers load: a bad config fails fast
    cfg = load_config(config, parse_overrides(overrides or []))
    for sec, key in (("models", "teacher"), ("models", "student"), ("data", "prompts")):
        if not getattr(getattr(cfg, sec), key):
            raise ConfigError(f"{config}: field '{sec}.{key}' is required by `npd run`; set it")
    if not (cfg.data.eval_prompts or cfg.eval.sets):
        raise ConfigError(
            f"{config}: `npd run` needs held-out prompts; set data.eval_prompts, or eval.sets "
            "for several sets"
        )
    from npd_core.pipeline.resolve import new_run_id, resolve_spec

    spec, _ = resolve_spec(cfg, out, new_run_id())
    err.print(f"run {spec['run_id']}: {cfg.rounds} rounds, staleness {cfg.staleness}")
    emit(run_flow(spec, out, show=True), as_json)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="a read-only SQL query over the store's views")],
    db: Annotated[Path, typer.Option(help="DuckDB file")] = Path("npd-out/npd.duckdb"),
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header on stdout")] = False,
) -> None:
    """Query samples, scores, filtered, rounds, runs, prompts, checkpoints, evals."""
    from npd_core.store import query as run_query

    table = run_query(db, query)
    rows = table.to_pylist()
    if as_json:
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
    elif as_csv:
        w = csv.writer(sys.stdout)
        w.writerow(table.column_names)
        for r in rows:
            w.writerow([r[c] for c in table.column_names])
    else:
        t = Table()
        for c in table.column_names:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*[_cell(r[c]) for c in table.column_names])
        Console().print(t)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    s = "" if v is None else str(v)
    return s if len(s) <= 80 else s[:77] + "..."


@config_app.command("init")
def config_init(path: Annotated[Path, typer.Argument(help="where to write the config")]) -> None:
    """Write a commented default config."""
    from npd_core.config import commented_yaml

    if path.exists():
        raise ConfigError(f"{path}: already exists; choose another path or delete it first")
    path.write_text(commented_yaml(), encoding="utf-8")
    err.print(f"wrote {path}")


@config_app.command("show")
def config_show(config: Annotated[Path, typer.Argument(help="config YAML")]) -> None:
    """Print the resolved config (defaults filled in, paths made absolute)."""
    import yaml

    from npd_core.config import load_config

    sys.stdout.write(yaml.safe_dump(load_config(config).model_dump(mode="json"), sort_keys=False))


def _resume_hint() -> str:
    """How to resume the run this command started, once it is saved (else nothing)."""
    from npd_core.pipeline.spec import RunSpec

    if not RUN or not RunSpec.path(RUN["out"], RUN["run_id"]).is_file():
        return ""
    return f"; `npd retry {RUN['run_id']} --out {RUN['out']}` resumes at the failed stage"


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    """Deprecations as one ``warning:`` line (no source line of npd's internals)."""
    return f"warning: {message}\n"


def main() -> None:
    """Console entry point: one ``error:`` line per user error, tracebacks only with --debug."""
    warnings.formatwarning = _warning_line
    try:
        app()
    except SystemExit as e:
        if e.code != 130:  # typer turns Ctrl-C into a silent exit 130
            raise
        _fail(
            "interrupted; finished stages are kept, the one in progress is not (a stage is "
            f"visible whole or not at all){_resume_hint() or '; nothing to resume'}",
            130,
        )
    except NPDError as e:
        if DEBUG["on"]:
            raise
        _fail(f"{e}{'' if isinstance(e, TrainingError) else _resume_hint()}", e.exit_code)
    except Exception as e:  # a failed stage: still one line; the run is retriable
        if DEBUG["on"]:
            raise
        full = disk_full(e, getattr(e, "filename", None) or RUN.get("out") or ".")
        msg = str(full) if full else f"{type(e).__name__}: {' '.join(str(e).split())}"
        _fail(f"{msg}{_resume_hint()} (`npd --debug` shows the traceback)", 1)


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Argument(help="run config YAML (default: toy world)")
    ] = None,
    out: OutOpt = Path("npd-out"),
    cron: Annotated[str, typer.Option(help="schedule, cron syntax (local time)")] = "0 2 * * *",
    name: Annotated[str, typer.Option(help="deployment name")] = "nightly",
) -> None:
    """Serve npd's deployments from this process (Prefect ``serve``): the scheduled distill
    flow runs on the cron schedule, and runs started or retried from the Prefect UI are picked
    up. Each run continues from the best checkpoint of the last one. Ctrl-C stops it."""
    from npd_core.config import load_config

    if config is not None:
        load_config(config)  # fail now, not at 2 a.m.
    prefect_env(out)
    from prefect import serve as prefect_serve

    from flows.serve import deployments

    items = deployments(config, out, cron, name)
    for d in items:
        err.print(f"serving {d.flow_name}/{d.name} on '{cron}' with {d.parameters}")
    err.print("Ctrl-C to stop")
    prefect_serve(*items)


@app.command()
def retry(
    run_id: Annotated[str, typer.Argument(help="the run to resume")],
    out: OutOpt = Path("npd-out"),
    as_json: JsonOpt = False,
) -> None:
    """Run a failed (or killed) run again: finished stages come back Cached from their persisted
    results, the failed stage and everything after it run."""
    from dataclasses import asdict

    from npd_core.pipeline.spec import RunSpec
    from npd_core.store import lease

    spec = RunSpec.load(out, run_id)
    lease.ensure_free(out, run_id)  # a killed run is free; a live one is refused
    err.print(f"retrying run {run_id} in {out}")
    emit(run_flow(asdict(spec), out, show=True), as_json)


@app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="a run id; default: every run")] = None,
    out: OutOpt = Path("npd-out"),
    as_json: JsonOpt = False,
) -> None:
    """Runs with their rounds (scores, kept fractions, stage seconds) from the store, a score
    column per eval set (the primary one starred when there are several); marks each run's
    best checkpoint, the rounds whose weights were pruned (train.keep_checkpoints), and flags
    rounds that regressed on the primary set (eval.regression_margin).
    A run whose process was killed shows as 'crashed' (its lease holder is gone), one that
    failed as 'failed'; `npd retry` resumes both."""
    from npd_core.store.status import run_statuses

    runs = run_statuses(out, run_id)
    if as_json:
        sys.stdout.write(json.dumps(runs, default=str) + "\n")
        return
    for r in runs:
        title = f"{r['run_id']}  {r['status']}  ({r['name']})"
        if r["status"] in ("crashed", "failed"):
            title += f"  — `npd retry {r['run_id']} --out {out}` resumes it"
        t = Table(title=title, title_justify="left")
        primary = next((x["eval_set"] for x in r["rounds"] if x["eval_set"]), None)
        names = {n for x in r["rounds"] for n in x["scores"]} or {primary}
        sets = sorted(names, key=lambda n: (n != primary, n))  # the primary set first
        for col in ("round", *_score_columns(sets, primary), "kept", "loss", "seconds"):
            t.add_column(col, justify="right")
        t.add_column("best / flag", justify="right")
        for x in r["rounds"]:
            secs = x["stage_seconds_json"] and sum(json.loads(x["stage_seconds_json"]).values())
            flag = "best" if x["is_best"] else ""
            if x["regressed"]:
                flag = f"[red]regressed {x['score'] - x['best_before']:+.1f}[/red]"
            if not x["weights"]:
                flag = f"{flag} [dim]pruned[/dim]".strip()
            t.add_row(
                str(x["round"]),
                *(_fmt(x["scores"].get(n), ".1f") for n in sets),
                _fmt(x["kept_fraction"], ".2f"),
                _fmt(x["mean_loss"], ".4f"),
                _fmt(secs, ".1f"),
                flag,
            )
        Console().print(t)


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


@app.command()
def ui(
    out: OutOpt = Path("npd-out"),
    port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow UI port")] = 5000,
) -> None:
    """Start a Prefect server and the MLflow UI over the output directory (its mlflow.db and
    artifacts); prints both URLs; Ctrl-C stops both, child processes included."""
    from npd_core.servers import serve_ui

    out.mkdir(parents=True, exist_ok=True)
    # soft_wrap: a URL or an export line stays one line in a log file too (no console width)
    serve_ui(
        out,
        port,
        mlflow_port,
        say=lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True),
    )


@app.command()
def export(
    run_id: Annotated[str, typer.Argument(help="the run to export from")],
    dest: Annotated[
        Path | None, typer.Argument(help="new or empty directory to write (or only --register)")
    ] = None,
    round_: Annotated[
        str, typer.Option("--round", help="'best' (highest held-out score) or a round number")
    ] = "best",
    register: Annotated[
        str | None,
        typer.Option(
            "--register",
            help="also add the checkpoint to the MLflow Model Registry as a new version of "
            "this model name",
        ),
    ] = None,
    out: OutOpt = Path("npd-out"),
    as_json: JsonOpt = False,
) -> None:
    """Write a run's checkpoint as a plain HF model directory (weights, config, tokenizer) that
    AutoModelForCausalLM/AutoTokenizer.from_pretrained load without npd, and/or register it in
    the MLflow Model Registry (--register NAME: a transformers model with its tokenizer, tagged
    with run id, round and score)."""
    from flows.export import register_checkpoint
    from npd_core.store.export import export_checkpoint, parse_round

    if dest is None and register is None:
        raise StoreUsageError("npd export: give a directory to write, --register NAME, or both")
    k = parse_round(round_)
    info = export_checkpoint(out, run_id, k, dest) if dest is not None else {}
    if register is not None:
        info |= register_checkpoint(out, run_id, k, register)
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    score = "" if info["score"] is None else f" ({info['metric']} {info['score']:.4g})"
    what = f"{run_id} round {info['round']}{score}"
    if dest is not None:
        err.print(f"exported {what} to {info['dir']}")
    if register is not None:
        err.print(f"registered {what} as MLflow model {register} version {info['version']}")


def _one_line_short_help(typer_app: typer.Typer) -> None:
    """Command lists show the first paragraph of each command's docstring with its line breaks
    (typer's rich help): give every command that paragraph reflowed as its short help."""
    for c in typer_app.registered_commands:
        doc = c.help or inspect.getdoc(c.callback) or ""
        c.short_help = c.short_help or " ".join(doc.split("\n\n")[0].split())
    for g in typer_app.registered_groups:
        _one_line_short_help(g.typer_instance)


_one_line_short_help(app)  # last: every command is registered by now
