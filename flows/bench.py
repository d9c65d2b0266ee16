"""``npd bench …``: bare ``npd bench`` is the headline comparison (``flows.headline``: NPD vs
onpolicy vs sft and the ablations, each a flow run, one MLflow parent run); the subcommands
benchmark parts of the method itself (no Prefect, no output directory).

``npd bench generate`` runs :func:`npd_core.bench.generate.run_bench` (HF vs vLLM generation and
scoring). ``npd bench scale`` runs :func:`npd_core.bench.scale.run_bench` (a round's shards on 1
and 2 Ray workers, its learner on 1 and 2 torchrun ranks). ``npd bench packing`` runs
:func:`npd_core.bench.packing.run_bench` (the same function as ``python -m
npd_core.bench.packing``), prints one JSON object on stdout with ``--json`` (a table on
stderr otherwise) and, when ``MLFLOW_TRACKING_URI`` is set, logs the figures to MLflow
(experiment ``npd-bench``, one run per call, through ``tasks.tracking.log_figures``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.options import BenchConfigOpt, JsonOpt, WorldOutOpt

bench_app = typer.Typer(
    help="npd bench: NPD vs onpolicy vs sft (+ ablations) on one wall-clock budget each; "
    "subcommands benchmark parts of the method."
)
err = Console(stderr=True)
EXPERIMENT = "npd-bench"


@bench_app.callback(invoke_without_command=True)
def headline(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="npd, sft, onpolicy; 1 seed; a quarter of the budget")
    ] = False,
    seeds: Annotated[
        int | None,
        typer.Option(help="seeds of npd, sft, onpolicy and peers (default 3; ablations 1)", min=1),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("npd-out"),
    config: BenchConfigOpt = None,
    budget_s: Annotated[
        float | None,
        typer.Option("--budget-s", help="training seconds per variant (default 140)", min=1),
    ] = None,
    variants: Annotated[
        str | None, typer.Option(help="comma-separated, e.g. npd,sft,onpolicy,filter-band")
    ] = None,
    peers: Annotated[str | None, typer.Option(help="external peers to add, e.g. trl")] = None,
    world: Annotated[
        str,
        typer.Option(
            "--world", help="embedded world when the config names no models: toy, long, views, smol"
        ),
    ] = "toy",
    resume: Annotated[
        str | None,
        typer.Option(help="a bench id: run what it left unfinished (give the same options)"),
    ] = None,
) -> None:
    """The headline benchmark (when no subcommand is given)."""
    if ctx.invoked_subcommand is not None:
        return
    from flows.headline import main

    main(
        as_json,
        out=out,
        config=config,
        quick=quick,
        seeds=seeds,
        budget_s=budget_s,
        names=[v.strip() for v in variants.split(",") if v.strip()] if variants else None,
        peers=[p.strip() for p in peers.split(",") if p.strip()] if peers else [],
        world=world,
        resume=resume,
    )


@bench_app.command("packing")
def packing(
    as_json: JsonOpt = False,
    n_samples: Annotated[int, typer.Option(help="samples in the length mix", min=8)] = 2048,
    lengths: Annotated[
        Path | None, typer.Option(help="file of prompt/response length pairs (default: synthetic)")
    ] = None,
    median_len: Annotated[float, typer.Option(help="synthetic: median sample length")] = 60.0,
    p99_len: Annotated[
        float, typer.Option(help="synthetic: 99th-percentile sample length")
    ] = 400.0,
    max_seq_len: Annotated[
        int | None, typer.Option(help="packed row length; default 2 × p99 sample length")
    ] = None,
    rows_per_step: Annotated[int, typer.Option(help="packed rows per optimizer step", min=1)] = 4,
    model_size: Annotated[str, typer.Option(help="student: tiny (0.2 M), small, 100m")] = "tiny",
    model: Annotated[
        Path | None, typer.Option(help="HF checkpoint to train instead (e.g. the toy student)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, …")] = "auto",
    attention: Annotated[
        str, typer.Option(help="packed: auto (fastest exact), sdpa, eager, sdpa_varlen, …")
    ] = "auto",
    padded_attention: Annotated[str, typer.Option(help="padded baseline: auto, sdpa, …")] = "auto",
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="default: on for CUDA, off for CPU")
    ] = None,
    sft_weight: Annotated[float, typer.Option(help="weight of the sft (CE) mix", min=0)] = 0.0,
    mega_batch_mult: Annotated[int, typer.Option(help="padded grouping; 0 = Trainer's rule")] = 0,
    threads: Annotated[
        int | None, typer.Option(help="CPU intra-op threads (default 1; 0 = torch's default)")
    ] = None,
    peak_tflops: Annotated[float | None, typer.Option(help="for MFU; CUDA: looked up")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile both students")] = False,
    learner_steps: Annotated[
        int, typer.Option(help="timed train_round steps per exact kernel (0: skip)", min=0)
    ] = 8,
    seed: Annotated[int, typer.Option(help="seeds lengths, tokens, init and packing")] = 0,
) -> None:
    """Packed vs padded (length-grouped) training of the same student on the same samples;
    which packed-attention kernel ``train.attention: auto`` picks, and the real learner timed
    with each."""
    from npd_core.bench.packing import read_lengths, run_bench

    knobs: dict[str, Any] = dict(
        n_samples=n_samples, median_len=median_len, p99_len=p99_len, max_seq_len=max_seq_len,
        rows_per_step=rows_per_step, model_size=model_size, model=str(model) if model else None,
        device=device, attention=attention,
        padded_attention=padded_attention, bf16=bf16, sft_weight=sft_weight,
        mega_batch_mult=mega_batch_mult, threads=threads, peak_tflops=peak_tflops,
        compile=compile, learner_steps=learner_steps, seed=seed,
    )  # fmt: skip
    pairs = read_lengths(lengths) if lengths else None
    res = run_bench(
        lengths=pairs, log=lambda m: err.print(m, markup=False, highlight=False), **knobs
    )
    if os.environ.get("MLFLOW_TRACKING_URI"):
        from tasks.tracking import log_figures

        knobs["lengths"] = str(lengths) if lengths else "synthetic"
        run_id = log_figures(EXPERIMENT, "packing", res, knobs)
        err.print(f"MLflow run {run_id} ({os.environ['MLFLOW_TRACKING_URI']})")
    if as_json:
        sys.stdout.write(json.dumps(res) + "\n")
    else:
        print_table(res)


@bench_app.command("generate")
def generate(
    as_json: JsonOpt = False,
    model: Annotated[
        Path | None, typer.Option(help="generating model (HF dir); default: the toy student")
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="scoring model (HF dir); default: the toy teacher")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="prompts JSONL; default: the toy train prompts")
    ] = None,
    out: WorldOutOpt = Path("npd-out"),
    n_prompts: Annotated[int, typer.Option(help="prompts generated for", min=1)] = 512,
    n_per_prompt: Annotated[int, typer.Option(help="samples per prompt", min=1)] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="response length cap", min=1)] = 48,
    batch_size: Annotated[int, typer.Option(help="sequences decoded together", min=1)] = 256,
    temperature: Annotated[float, typer.Option(help="sampling temperature", min=0)] = 1.0,
    top_k: Annotated[int, typer.Option(help="teacher log-probs kept per position", min=1)] = 16,
    threads: Annotated[int, typer.Option(help="CPU threads of each side", min=1)] = 1,
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="default: on for CUDA, off for CPU")
    ] = None,
) -> None:
    """HF (batched, KV cache) vs vLLM: generation and teacher scoring of the same prompts."""
    from npd_core.bench.generate import run_bench

    if not (model and teacher and prompts):
        from npd_core.store import Store
        from npd_core.toy.world import build_toy_world

        Store(out)
        world = build_toy_world(out / "toy", log=lambda m: err.print(m, markup=False))
        model = model or world.student
        teacher = teacher or world.teacher
        prompts = prompts or world.train_prompts
    res = run_bench(
        model=str(model), teacher=str(teacher), prompts=str(prompts), n_prompts=n_prompts,
        n_per_prompt=n_per_prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
        temperature=temperature, top_k=top_k, threads=threads, bf16=bf16,
        log=lambda m: err.print(m, markup=False, highlight=False),
    )  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(res) + "\n")
    else:
        print_table(res, "npd bench generate")


@bench_app.command("filter")
def filter_study(
    stage: Annotated[
        str,
        typer.Option(
            help="screen (every rule × staleness 1, 4), confirm (best 2 + ref.), junk "
            "(each score's AUROC for planted junk, no training: needs --run) or trained (the "
            "best 2 junk scores and conditional with planted junk and without, against a "
            "matched random drop)"
        ),
    ] = "screen",
    as_json: JsonOpt = False,
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("npd-out"),
    config: BenchConfigOpt = None,
    budget_s: Annotated[
        float | None,
        typer.Option(
            "--budget-s", help="training seconds of a full-budget cell (default 140)", min=1
        ),
    ] = None,
    run: Annotated[
        str | None, typer.Option("--run", help="junk: the run whose checkpoints θ_k are sampled")
    ] = None,
    rounds: Annotated[
        str, typer.Option(help="junk: comma-separated rounds k of θ_k")
    ] = "1,2,3,4,5",
    n: Annotated[int, typer.Option(help="junk: samples per round", min=8)] = 1024,
    junk: Annotated[
        Path | None,
        typer.Option(
            "--junk", help="trained: the junk stage's JSON (default OUT/filter-study/junk.json)"
        ),
    ] = None,
) -> None:
    """The pre-registered filter study (docs/results); resumes where it stopped."""
    from flows.env import prefect_env
    from flows.filter_study import run_study, run_trained
    from npd_core.errors import ConfigError

    log = lambda m: err.print(m, markup=False, highlight=False)  # noqa: E731
    if stage == "junk":
        from npd_core.bench.junk import run_junk

        if run is None:
            raise ConfigError("--stage junk needs --run RUN_ID (a run with checkpoints θ_k)")
        ks = [int(x) for x in rounds.split(",") if x.strip()]
        res = run_junk(str(out), run, ks, n, log=log)
        if as_json:
            sys.stdout.write(json.dumps(res) + "\n")
        return
    if stage not in ("screen", "confirm", "trained"):
        raise ConfigError(f"--stage {stage!r}: choose screen, confirm, junk or trained")
    prefect_env(out)
    if stage == "trained":
        res = run_trained(out, config, budget_s, junk, log)
    else:
        res = run_study(stage, out, config, budget_s, log)
    if as_json:
        sys.stdout.write(json.dumps(res, allow_nan=False) + "\n")
    elif stage == "trained":
        for row in res["summary"]:
            kept, junk_kept = row["kept_share"], row["junk_kept_share"]
            err.print(
                f"{row['junk']:<5} {row['rule']:<9} {row['score'] or '':<15} final "
                f"{row['final_score']:6.2f}  kept {'-' if kept is None else f'{kept:.2f}'}  "
                f"junk kept {'-' if junk_kept is None else f'{junk_kept:.2f}'}"
            )
        rec = res["decision"]["recommended"]
        err.print("recommended: " + (", ".join(f"{x['rule']} {x['score']}" for x in rec) or "none"))
    else:
        for row in res["summary"]:
            err.print(
                f"{row['rule']:<10} st{row['staleness']}  final {row['final_score']:6.2f}  "
                f"kept {row['kept_fraction']:.2f}  dropped KL {row['dropped_kl_share']:.2f}"
            )


@bench_app.command("ifd-views")
def ifd_views(
    run: Annotated[str, typer.Option("--run", help="run whose checkpoints θ_k are sampled")],
    as_json: JsonOpt = False,
    out: Annotated[Path, typer.Option("--out", help="the run's output directory")] = Path(
        "npd-out"
    ),
    checkpoints: Annotated[str, typer.Option(help="comma-separated rounds k of θ_k")] = "3,6",
    n: Annotated[int, typer.Option(help="samples per checkpoint", min=8)] = 2048,
    text: Annotated[
        list[str] | None, typer.Option(help="extra view: this text as a prompt (repeatable)")
    ] = None,
) -> None:
    """Spearman ρ of Δ-IFD with the per-token forward KL, per prompt-less view (filter.view)."""
    from npd_core.bench.ifd_views import run_views

    ks = [int(x) for x in checkpoints.split(",") if x.strip()]
    res = run_views(
        str(out), run, ks, n, text or [], log=lambda m: err.print(m, markup=False, highlight=False)
    )
    if as_json:
        sys.stdout.write(json.dumps(res) + "\n")
    else:
        print_table(res["mean_spearman"], "npd bench ifd-views: mean Spearman ρ")


def print_table(res: dict[str, Any], title: str = "npd bench packing") -> None:
    t = Table(title=title, title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in res.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    err.print(t)


@bench_app.command("cost")
def cost(
    bench: Annotated[
        Path | None,
        typer.Option("--bench", help="an `npd bench` JSON (default: docs/bench-WORLD.json)"),
    ] = None,
    world: Annotated[
        str, typer.Option("--world", help="the bench's world: toy, long, views, smol")
    ] = "toy",
    out: WorldOutOpt = Path("npd-out"),
    as_json: JsonOpt = False,
) -> None:
    """Cost model: each variant's seconds per stage from unit costs measured here and the
    bench's sample efficiency (seed 0), against what seeds 1-2 measured."""
    from npd_core.bench import cost as cost_model
    from npd_core.errors import ConfigError
    from npd_core.toy.world import WORLDS

    if world not in WORLDS:
        raise ConfigError(f"--world {world}: unknown world; choose from {', '.join(WORLDS)}")
    path = bench or Path("docs") / f"bench-{world}.json"
    if not path.is_file():
        raise ConfigError(f"--bench {path}: no such file; run `npd bench --world {world}` first")
    log = lambda m: err.print(m, markup=False)  # noqa: E731
    res = cost_model.run(cost_model.localize(path, world, out, log), log=log)
    res["bench"] = str(path)
    print(json.dumps(res, indent=1) if as_json else cost_model.summary(res))


@bench_app.command("scale")
def scale(
    as_json: JsonOpt = False,
    out: WorldOutOpt = Path("npd-out"),
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML overriding the round's settings")
    ] = None,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="the tiny toy world and a 16-prompt round (a check)")
    ] = False,
) -> None:
    """Generation + scoring of one round on K = 1 and 2 Ray workers, and its training on N = 1
    and 2 torchrun ranks (gloo), one thread each: seconds, speedups, the overheads (Ray start,
    task dispatch, torchrun start) and whether the results are the same. Writes its runs to
    OUT/bench-scale (replaced on every call)."""
    from npd_core.bench.scale import run_bench, scale_spec
    from tasks.tracking import flatten

    log = lambda m: err.print(m, markup=False, highlight=False)  # noqa: E731
    res = run_bench(scale_spec(out, config, tiny, log), log=log)
    res["world"] = "tiny" if tiny else "toy"
    if as_json:
        sys.stdout.write(json.dumps(res) + "\n")
    else:
        for half, key in (("shards", "k"), ("train", "nproc")):
            part = dict(res[half])
            for arm in part.pop("arms"):
                part[f"{key}={arm[key]}"] = {k: v for k, v in arm.items() if k != key}
            figures = {
                k: v for k, v in flatten(part).items() if v is not None and not isinstance(v, list)
            }
            print_table(figures, f"npd bench scale: {half}")
    flags = ("samples_identical", "scores_agree", "weights_agree")
    differ = [f for f in flags if not {**res["shards"], **res["train"]}[f]]
    if differ:  # the results must be the same whatever the layout
        err.print(f"error: the layouts' results differ: {', '.join(differ)} false")
        raise typer.Exit(1)
