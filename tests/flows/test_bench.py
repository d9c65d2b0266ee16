"""The headline benchmark's variants on the tiny world under a real Prefect server: each runs
briefly as its own flow run with its own MLflow run under the bench's parent; ``npd bench
--quick --json`` prints every field (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from bench_config import TINY_BENCH
from typer.testing import CliRunner

from flows.cli import app
from flows.variants import run_onpolicy, run_sft, variants
from npd_core.bench.harness import Hyper, checkpoint_times
from npd_core.bench.plan import BenchContext
from npd_core.config import NPDConfig
from npd_core.data import read_prompts
from npd_core.errors import ConfigError
from npd_core.store import Store
from tasks import tracking

CFG = TINY_BENCH
HYPER = Hyper(lr=3e-3, rows_per_step=4, prompts_per_step=8)
ONE_ROUND = {
    "train_s_per_row": 1e3,
    "produce_s_per_sample": 1e3,
    "rows_per_sample": 0.2,
    "overlap_gain": 1.0,
}


def _paths(world) -> dict[str, str]:
    keys = ("teacher", "student", "train_prompts", "eval_prompts")
    return {k: str(getattr(world, k)) for k in keys}


@pytest.fixture
def ctx(tmp_path, tiny_world, prefect_server, monkeypatch) -> BenchContext:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Store(tmp_path)
    parent = tracking.start_run(str(tmp_path), "bench-t", "bench", {})
    cfg = NPDConfig.model_validate(CFG).model_dump(mode="json")
    return BenchContext(
        tmp_path,
        "bench-t",
        _paths(tiny_world),
        cfg,
        1e4,  # NPD's budget: the probe figures size its runs to one round, all of it on the curve
        [3.0, 6.0],  # the baselines' checkpoints (sft's teacher answers, on its clock, take ~1–3 s)
        parent,
        lambda m: None,
        calibration={str(HYPER.rows_per_step): {"1": dict(ONE_ROUND)}},  # CFG: 1 thread
    )


def _children(ctx: BenchContext) -> dict[str, str]:
    c = tracking.client(ctx.out)
    exp = c.get_run(ctx.mlflow_parent).info.experiment_id
    runs = c.search_runs([exp], f"tags.mlflow.parentRunId = '{ctx.mlflow_parent}'")
    return {r.info.run_id: r.info.run_name for r in runs}


def test_npd_and_each_ablation_run_one_round(ctx):
    """One round each (the probe figures size every run to one round); the ablation's knob is
    in its run's config, and on the same samples the band keeps fewer than npd's rule none."""
    known = variants(NPDConfig.model_validate(CFG))
    names = ["npd", "filter-band", "filter-fence", "drop-unfinished", "staleness-0"]
    names += ["staleness-2", "steps-x0.5", "steps-x2"]
    levers = ["staleness-4", "mix-teacher", "mix-reference", "normalize-sequence", "rest-mass"]
    levers += ["reverse-kl", "sampled-reverse-kl"]  # each lever's own tests run it (test_levers*)
    assert sorted(n for n in known if n not in ("sft", "onpolicy")) == sorted(names + levers)
    res = {n: known[n].run(ctx, 0, HYPER) for n in names}
    store = Store(ctx.out, create=False)
    for n, r in res.items():
        assert len(r.curve) == 2 and r.curve[1]["wall_s"] > 0, n
        assert r.wall_s == pytest.approx(r.curve[1]["wall_s"])
        assert r.settings["rounds"] == 1 and r.train_tokens > 0
        assert set(r.stage_seconds) == {"generate", "score", "filter", "pack", "train", "evaluate"}
        assert all(t > 0 for t in r.stage_seconds.values()), (n, r.stage_seconds)
        produced = (
            store.query("select sum(response_tokens) from samples where run_id = ?", [r.run_id])
            .column(0)[0]
            .as_py()
        )
        assert r.generated_tokens == produced > 0
    settings = {n: r.settings for n, r in res.items()}
    assert settings["filter-band"]["filter"] == "band" and settings["npd"]["filter"] == "none"
    assert settings["filter-fence"]["filter"] == "fence"
    assert settings["drop-unfinished"]["drop_unfinished"] and not settings["npd"]["drop_unfinished"]
    assert settings["staleness-0"]["staleness"] == 0 and settings["staleness-2"]["staleness"] == 2
    assert settings["steps-x0.5"]["steps_per_round"] == 1
    assert settings["steps-x2"]["epochs_per_round"] == 20
    q = "select run_id, step from checkpoints where round = 1"
    steps = {x["run_id"]: x["step"] for x in store.query(q).to_pylist()}
    assert steps[res["steps-x0.5"].run_id] == 1 and steps[res["steps-x2"].run_id] == 4
    assert {n: r.settings["optimizer_steps"] for n, r in res.items()}["npd"] == 2
    kept = {
        x["run_id"]: x["n"]
        for x in store.query("select run_id, count(*) n from filtered group by run_id").to_pylist()
    }
    assert kept[res["filter-band"].run_id] < kept[res["npd"].run_id]
    assert sorted(_children(ctx).values()) == sorted(f"{n}-s0" for n in names)


def test_sft_flow_stores_the_teachers_answers_and_trains_on_the_clock(ctx, tiny_world):
    r = run_sft(ctx, 0, HYPER)
    store = Store(ctx.out, create=False)
    rows = store.query(
        "select round, generator_checkpoint g, teacher, temperature t, count(*) n from samples "
        "where run_id = ? group by all",
        [r.run_id],
    ).to_pylist()
    n_train = len(read_prompts(tiny_world.train_prompts))
    teacher = str(Path(tiny_world.teacher).resolve())
    assert rows == [{"round": 0, "g": teacher, "teacher": teacher, "t": 0.0, "n": n_train}]
    evals = (
        store.query("select round from evals where run_id = ? order by round", [r.run_id])
        .column(0)
        .to_pylist()
    )
    assert evals == [0, 1, 2]
    walls = [p["wall_s"] for p in r.curve]
    assert walls[0] == 0 and walls == sorted(walls)
    assert walls[1] >= r.stage_seconds["generate"]  # the teacher's answers are on the clock
    assert 6.0 <= r.wall_s < 6.0 + 6.0 and r.settings["optimizer_steps"] >= 1  # ≤ one step past
    assert r.generated_tokens > 0 and r.train_tokens > 0
    c = tracking.client(ctx.out)
    assert len(c.get_metric_history(r.mlflow_run_id, "score")) == 2
    assert list(_children(ctx).values()) == ["sft-s0"]


def test_onpolicy_flow_samples_every_step_on_the_clock(ctx):
    r = run_onpolicy(ctx, 0, HYPER)
    assert [p["wall_s"] for p in r.curve][0] == 0 and len(r.curve) == 3
    assert 6.0 <= r.wall_s < 6.0 + 6.0 and r.settings["prompts_per_step"] == 8
    assert set(r.stage_seconds) == {"generate", "score", "train", "evaluate"}
    steps = r.settings["optimizer_steps"]
    assert steps >= 1 and r.generated_tokens >= steps * 8  # ≥ one token per sample
    store = Store(ctx.out, create=False)
    assert store.query("select count(*) from samples").column(0)[0].as_py() == 0  # in memory
    assert list(_children(ctx).values()) == ["onpolicy-s0"]


def test_unknown_variant_is_a_config_error(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--variants", "npd,nope", "--out", str(tmp_path)])
    assert isinstance(res.exception, ConfigError) and res.exception.exit_code == 2
    assert "unknown nope" in str(res.exception) and "filter-band" in str(res.exception)


@pytest.mark.slow
def test_bench_quick_json_has_every_field(tmp_path, tiny_world, prefect_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # prefect_env's changes are undone
    cfg = tmp_path / "tiny.yaml"
    models = {"teacher": str(tiny_world.teacher), "student": str(tiny_world.student)}
    data = {
        **CFG["data"],
        "prompts": str(tiny_world.train_prompts),
        "eval_prompts": str(tiny_world.eval_prompts),
    }
    cfg.write_text(yaml.safe_dump({**CFG, "models": models, "data": data}))
    out = tmp_path / "out"
    args = [
        "bench",
        "--quick",
        "--json",
        "--budget-s",
        "20",  # a quarter (--quick): 5 s, so NPD's round comes in time on a loaded machine too
        "--config",
        str(cfg),
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert set(rep["variants"]) == {"npd", "sft", "onpolicy"}
    start = rep["variants"]["npd"]["curve"][0]
    for name, v in rep["variants"].items():
        # every curve starts from θ_0's score at 0 s; the final score is the mean of the last
        # quarter of the clock's evaluations, at least two of them
        assert v["curve"][0] == start and start["wall_s"] == 0.0 and 0 <= start["score"] <= 100
        evals = v["curve"][1:] or v["curve"]  # θ_0 alone when no checkpoint came in time
        tail = [p["score"] for p in evals if p["wall_s"] >= 0.75 * rep["budget_s"]]
        tail = tail if len(tail) >= 2 else [p["score"] for p in evals[-2:]]
        assert v["final_score"] == pytest.approx(np.mean(tail)) and v["final_score_ci95"] is None
        assert v["final_points"] == [len(tail)]
        # the same curve by teacher forward tokens: cumulative, from 0
        by_tok = v["seed_curves_teacher_tokens"][0]
        assert [p["score"] for p in by_tok] == [p["score"] for p in v["curve"]]
        tokens = [p["teacher_tokens"] for p in by_tok]
        assert tokens[0] == 0 < tokens[-1] and tokens == sorted(tokens)
        assert 0 <= v["wall_s"] == v["curve"][-1]["wall_s"] <= 5.0 * 1.05  # later points cut
        assert v["train_tokens"] > 0 and v["generated_tokens"] > 0
        assert v["stage_seconds"]["train"] > 0 and min(v["stage_seconds"].values()) >= 0
        idle = v["idle_fraction"]
        assert set(idle) == set(v["stage_seconds"]) - {"evaluate"}
        assert idle["train"] == pytest.approx(max(0, 1 - v["stage_seconds"]["train"] / v["wall_s"]))
        assert v["hyperparameters"] == rep["grid"]["chosen"][name]
        assert v["tuned"] == "untuned" and isinstance(v["learns"], bool)  # --config: none recorded
    assert rep["speedup_untuned"] is True and rep["grid"]["separated"] == dict.fromkeys(
        rep["seeds"]
    )
    # the cost model calibrated on the runs themselves: a prediction, no seeds 1-2 to check it
    assert "predicted_speedup_75" in rep and "gpu_projection" in rep
    if rep["predicted_vs_measured_75"]:
        assert rep["predicted_vs_measured_75"]["measured_seeds_1_2"] is None
    # one seed each: the differences are those of the final scores, with no interval
    assert rep["speedup_vs_onpolicy"] is not None or rep["speedup_reason"]
    assert rep["speedup_ci95"] is None
    for key in ("speedups", "teacher_token_ratios"):
        assert [x["fraction"] for x in rep[key]] == [0.5, 0.75, 0.9, 1.0]
        assert all(x["ci95"] is None for x in rep[key])  # one seed: no interval
    for other in ("sft", "onpolicy"):
        assert rep[f"npd_minus_{other}_points"] == pytest.approx(
            rep["variants"]["npd"]["final_score"] - rep["variants"][other]["final_score"]
        )
        assert rep[f"npd_minus_{other}_points_ci95"] is None
    assert rep["seeds"] == {"npd": 1, "sft": 1, "onpolicy": 1} and rep["held_out_size"] == 16
    assert rep["ablations_vs_npd"] == {}  # the rule needs npd at two seeds or more
    assert rep["machine"]["cores"] >= 1 and rep["budget_s"] == 5.0
    # on-policy prompts per step fill the rows' tokens at the lengths θ_0 actually writes
    lengths, base = rep["grid"]["base_lengths"], rep["grid"]["base"]
    assert 0 < lengths["response_tokens"] <= CFG["generate"]["max_new_tokens"]
    per_row = CFG["pack"]["max_seq_len"] / (lengths["prompt_tokens"] + lengths["response_tokens"])
    assert base["prompts_per_step"] == round(base["rows_per_step"] * per_row)
    (by_threads,) = rep["calibration"].values()  # one batch size
    (probe,) = by_threads.values()  # one thread count (CFG sets threads: 1): one probe
    assert 1.0 <= probe["overlap_gain"] <= 2.0 and probe["train_s_per_row"] > 0
    png = Path(rep["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c = tracking.client(out)
    parent = c.get_run(rep["mlflow_run_id"])
    kids = c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{rep['mlflow_run_id']}'"
    )
    assert sorted(k.info.run_name for k in kids) == [
        "npd-s0",
        "onpolicy-s0",
        "probe-b4-t1-s0",
        "sft-s0",
    ]
    assert {a.path for a in c.list_artifacts(rep["mlflow_run_id"])} >= {"bench.png", "bench.json"}

    # what the cost model reads: optimizer steps on every point, per-seed totals, the world
    assert rep["eval_at"] == checkpoint_times(5.0)
    for v in rep["variants"].values():
        steps = [p["steps"] for p in v["seed_curves"][0]]
        assert steps[0] == 0 and steps == sorted(steps)
        (tot,) = v["seed_totals"]
        assert tot["train_tokens"] == v["train_tokens"] and tot["stage_seconds"]["train"] > 0
    assert all(Path(p).exists() for p in rep["paths"].values()) and rep["config"]["threads"] == 1
    bench_json = Path(rep["plot"]).with_name("bench.json")
    res = CliRunner().invoke(app, ["bench", "cost", "--bench", str(bench_json), "--out", str(out),
                                   "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout)
    units = model["units"]["1"]  # every stage at the config's one thread
    assert sorted(map(int, units["decode"])) == [8, 32, 128, 512, 1024]
    assert min(units["decode"].values()) > 0 and units["score_packed_tokens_per_s"] > 0
    line = units["train_packed"][str(rep["grid"]["chosen"]["npd"]["rows_per_step"])]
    assert line["tokens_per_s"] > 0 and line["c0_s"] >= 0
    # one seed: predictions to the target, no validation (needs seeds 1-2)
    assert model["speedup"]["measured_seeds_1_2"] is None
    assert "--seeds 3" in model["speedup"]["measured_reason"]
    for name in ("npd", "sft", "onpolicy"):
        assert model[name]["runs"] == []
        if model[name]["to_target"]:  # reached: no time where θ_0 already scores the target
            st, clock = (
                model[name]["to_target"]["stage_seconds"],
                model[name]["to_target"]["clock_s"],
            )
            assert min(st.values()) >= 0 and clock >= 0
            # sft's teacher answers are paid up front, whatever the target
            paid = sum(x for k, x in st.items() if not (name == "sft" and k == "generate"))
            assert (paid > 0) == (model["target_score"] > v["curve"][0]["score"])

    # --resume of a finished bench runs nothing again and reports the same results; a resume
    # with other options is refused
    res = CliRunner().invoke(app, [*args, "--resume", rep["bench_id"]])
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert again["variants"] == rep["variants"] and again["calibration"] == rep["calibration"]
    # each attempt's machine is on record (a bench carried elsewhere says where each part ran)
    assert [m["attempt"] for m in rep["machines"]] == [0]
    assert [m["attempt"] for m in again["machines"]] == [0, 1]
    assert again["machines"][1]["cores"] == rep["machine"]["cores"]
    children = f"tags.mlflow.parentRunId = '{rep['mlflow_run_id']}'"
    assert len(c.search_runs([parent.info.experiment_id], children)) == len(kids)
    res = CliRunner().invoke(app, [*args, "--seeds", "2", "--resume", rep["bench_id"]])
    assert isinstance(res.exception, ConfigError) and "planned with seeds=1" in str(res.exception)


def test_report_tables_fit_an_80_column_terminal(monkeypatch):
    """Every variant name and stage number is shown whole at 80 columns (rich truncates with …)."""
    import io

    from rich.console import Console

    from flows import headline

    v = {
        "seeds": 3,
        "final_score": 61.234,
        "final_score_ci95": [55.1, 67.3],
        "wall_s": 139.6,
        "hyperparameters": {"lr": 0.003, "rows_per_step": 16, "prompts_per_step": 101},
        "method": "npd",
        "stage_seconds": {"generate": 12.0, "score": 41.5, "train": 77.0, "evaluate": 9.0},
        "train_tokens": 4_560_000,
        "generated_tokens": 351_000,
    }
    rep = {
        "bench_id": "bench-20261126-000000-abcd",
        "budget_s": 140.0,
        "held_out_size": 1000,
        "variants": {name: v for name in ("npd", "onpolicy", "staleness-2", "steps-300")},
        "speedup_vs_onpolicy": 3.5,
        "speedup_ci95": [2.0, 5.0],
        "npd_minus_sft_points": 1.5,
        "npd_minus_onpolicy_points": 9.0,
        "plot": "/x/bench.png",
        "mlflow_uri": "sqlite:///x/mlflow.db",
        "mlflow_run_id": "r",
        "speedup_untuned": True,
        "predicted_vs_measured_75": {"predicted": 1.82, "measured_seeds_1_2": 1.92,
                                     "relative_error": -0.052},
    }  # fmt: skip
    rep["variants"] = {**rep["variants"], "drop-unfinished": {**v, "learns": False}}
    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(headline, "err", console)
    headline.print_report(rep)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    for needle in ("staleness-2", "steps-300", "55.1–67.3", "4.56M", "351k", " 42 ", " 77 "):
        assert needle in text
    assert "speedup vs onpolicy: 3.50× (95% CI [2.00, 5.00]) (untuned" in text
    assert "does not learn (no grid point above its start by 1 SE): drop-unfinished" in text
    assert "predicted_speedup_75: 1.82× (seeds 1–2 measured 1.92×, -5%)" in text


def test_run_variants_runs_only_what_a_resumed_bench_left_and_saves_each_run(tmp_path):
    """npd finished seed 0 before the bench stopped: seeds 1-2 and the ablation run (with fresh
    run ids, the attempt's), each saved as it ends."""
    from flows.headline import run_variants
    from npd_core.bench.harness import VariantResult
    from npd_core.bench.plan import BenchPlan, Variant
    from npd_core.bench.progress import Progress
    from npd_core.bench.search import GRID

    ran = []

    def runner(name):
        def run(ctx, seed, h):
            on_disk = Progress.resume(tmp_path / "b", {}).results  # what a crash now keeps
            assert sum(map(len, on_disk.values())) == 1 + len(ran)  # seed 0, then each run
            ran.append(ctx.spec(name, seed, {}).run_id)
            return VariantResult([{"wall_s": 0.0, "score": float(seed)}], 1.0, 0, 0, {})

        return run

    selected = [Variant("npd", "npd", runner("npd"), main=True)]
    selected.append(Variant("staleness-0", "npd", runner("staleness-0")))
    plan = BenchPlan(
        cfg=NPDConfig(), out=tmp_path, bench_id="b", started=0.0, selected=selected, methods={},
        paths={}, budget_s=10.0, n_seeds=3, grid=GRID, base=HYPER, lengths={}, points=[HYPER],
        held_out=16, quick=False, resume=True,
    )  # fmt: skip
    progress = Progress(tmp_path / "b", {}, 0.0, attempt=1)
    progress.results["npd"] = [VariantResult([{"wall_s": 0.0, "score": 9.0}], 1.0, 0, 0, {})]
    progress.save()
    paths = dict.fromkeys(("teacher", "student", "train_prompts", "eval_prompts"), "x")
    ctx = BenchContext(tmp_path, "b", paths, {}, 10.0, [], "", lambda m: None, attempt=1)
    run_variants(ctx, plan, {"npd": HYPER}, progress)
    assert ran == ["b-a1-npd-s1", "b-a1-npd-s2", "b-a1-staleness-0-s0"]
    assert [r.curve[0]["score"] for r in progress.results["npd"]] == [9.0, 1.0, 2.0]
    assert Progress.resume(tmp_path / "b", {}).results == progress.results
