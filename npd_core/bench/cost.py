"""Cost model: each variant's seconds per stage from unit costs and sample efficiency.

    npd bench cost [--world toy|long] --bench BENCH.json [--json]
    python -m npd_core.bench.cost --bench BENCH.json [--json]      # torch + transformers only

Two halves, multiplied:

1. **Unit costs**, calibrated inside the bench from its own seed-0 runs (:func:`calibrate`: each
   stage's tokens over its recorded seconds, at the batch the run used), or measured in a
   process of its own on this device with the project's own code
   (``method.generate.generate``, ``method.score.score``, ``baselines.onpolicy.teacher_topk``,
   ``method.train.optimizer_step`` on rows from ``method.packing``), on the bench's teacher and
   student at the bench's lengths, batches and thread counts: student decoding tokens/s at
   batch 8…1024, the teacher's decoding (sft's answers), teacher scoring tokens/s packed (NPD's
   score stage) and padded (on-policy's step), and training step seconds packed and padded as a
   line ``c0 + tokens / rate`` (``c0``, the per-step fixed cost, is its intercept).
2. **Counts**, read off the bench's curves: teacher forward tokens and optimizer steps where a
   curve first reaches a score (sample efficiency), and the run's ratios (generated tokens per
   teacher token, trained tokens per step, teacher tokens per NPD round).

A stage's seconds = count × unit cost. ``sft`` and ``onpolicy`` run their stages one after the
other, so their clock is the sum. NPD's clock is the one its rounds are sized by
(``pipeline_clock``): producing a round (generate + score) takes P, learning it L, and
overlapped rounds take ``P + (R − 1)·M + L`` with ``M = max(P, L, (P + L) / g)``, ``g`` the
overlap gain the bench's probe measured. The filter and pack stages (under 2% of a round here)
and the Prefect and I/O gaps (off every clock) are left out.

Validation: counts from seed 0, the prediction compared with what seeds 1–2 measured: the
speedup to 75% of onpolicy's gain, and each stage's seconds over each run. Every ``npd bench``
reports the in-run prediction (:func:`in_run`: ``predicted_speedup_75``,
``predicted_vs_measured_75``) and the GPU projection: the same model with the unit costs of
``docs/gpu-bench.json`` (H100, 0.5 B student / 3 B teacher shapes), its assumptions listed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (8, 32, 128, 512, 1024)  # student decoding batch sizes measured
TARGET = 0.75  # of onpolicy's gain: the speedup the model is validated on
TOLERANCE = 0.25  # predicted speedup within ±25% of the measured one
SCORE_SAMPLES = 512  # samples scored for the packed teacher rate
TIMED_STEPS = 4  # training steps timed per batch size (after one warm-up step)
GPU_BENCH = Path(__file__).resolve().parents[2] / "docs" / "gpu-bench.json"  # its H100 rates


# ---------------------------------------------------------------- counts from the bench
def at_score(curve: Sequence[dict[str, float]], target: float, key: str) -> float | None:
    """``key`` (teacher_tokens, steps) where ``curve`` first reaches ``target``, linear between
    its points as ``curves.time_to_reach`` is; None if it never does."""
    prev = curve[0]
    if prev["score"] >= target:
        return float(prev[key])
    for p in curve[1:]:
        if p["score"] >= target:
            f = (target - prev["score"]) / (p["score"] - prev["score"])
            return float(prev[key] + f * (p[key] - prev[key]))
        prev = p
    return None


def counts_at(
    name: str, curve: Sequence[dict[str, float]], totals: dict[str, Any], x: float, steps: float
) -> dict[str, float]:
    """A run's counts after ``x`` teacher tokens and ``steps`` optimizer steps, at the ratios of
    the whole run (``totals``, the same run's): what each stage's unit cost multiplies."""
    end = curve[-1]
    per_step = totals["train_tokens"] / max(1, end["steps"])
    if name == "sft":  # the teacher answers every prompt once, up front
        generated = totals["generated_tokens"]
    else:
        generated = totals["generated_tokens"] * x / max(1, end["teacher_tokens"])
    return {
        "teacher_tokens": x,
        "generated_tokens": generated,
        "steps": steps,
        "train_tokens": steps * per_step,
        "rounds": x / max(1, end["teacher_tokens"]) * (len(curve) - 1),
    }


# ---------------------------------------------------------------- seconds from counts
def pipeline_clock(produce: float, learn: float, rounds: float, gain: float | None) -> float:
    """The clock of ``rounds`` rounds that take ``produce`` and ``learn`` seconds each: in order
    (``gain`` None) their sum; overlapped, ``P + (R − 1)·M + L``, M = max(P, L, (P + L)/gain)."""
    if gain is None:
        return rounds * (produce + learn)
    middle = max(produce, learn, (produce + learn) / gain)
    return produce + max(0.0, rounds - 1) * middle + learn


def decode_rate(rates: dict[str, float], batch: float) -> float:
    """Decoding tokens/s at ``batch``: linear in log(batch) between the measured sizes."""
    b = sorted((int(k), v) for k, v in rates.items())
    return float(np.interp(math.log(batch), [math.log(k) for k, _ in b], [v for _, v in b]))


def step_seconds(line: dict[str, float], tokens: float) -> float:
    """Seconds of one training step of ``tokens`` tokens: ``c0 + tokens / rate``."""
    return line["c0_s"] + tokens / line["tokens_per_s"]


def predict(
    name: str, counts: dict[str, float], units: dict[str, Any], work: dict[str, Any]
) -> dict[str, Any]:
    """Seconds per stage and the clock of variant ``name`` (npd, sft, onpolicy) for ``counts``."""
    t_npd, t_base = str(work["threads"]["npd"]), str(work["threads"]["baselines"])
    steps = counts["steps"]
    per_step = counts["train_tokens"] / steps if steps else 0.0
    if name == "npd":
        u = units[t_npd]
        stage = {
            "generate": counts["generated_tokens"] / decode_rate(u["decode"], work["gen_batch"]),
            "score": counts["teacher_tokens"] / u["score_packed_tokens_per_s"],
            "train": steps * step_seconds(u["train_packed"][str(work["npd_rows"])], per_step),
        }
        r = max(counts["rounds"], 1e-9)
        clock = pipeline_clock(
            (stage["generate"] + stage["score"]) / r, stage["train"] / r, r, work["overlap_gain"]
        )
        return {"stage_seconds": stage, "clock_s": clock}
    u = units[t_base]
    if name == "sft":
        stage = {
            "generate": counts["generated_tokens"] / u["teacher_decode_tokens_per_s"],
            "train": steps * step_seconds(u["train_packed"][str(work["sft_rows"])], per_step),
        }
    elif name == "onpolicy":
        batch = work["onpolicy_prompts"] * work["n_per_prompt"]
        stage = {
            "generate": counts["generated_tokens"] / decode_rate(u["decode"], batch),
            "score": counts["teacher_tokens"] / u["score_padded_tokens_per_s"],
            "train": steps * step_seconds(u["train_padded"], per_step),
        }
    else:
        raise ValueError(f"no cost model for variant {name!r}")
    return {"stage_seconds": stage, "clock_s": sum(stage.values())}


def model_bench(
    bench: dict[str, Any], units: dict[str, Any], work: dict[str, Any]
) -> dict[str, Any]:
    """Predictions for npd, sft and onpolicy of ``bench`` (its JSON) at ``units`` measured at
    ``work``: to the target from seed 0's counts, over each run of seeds 1–2, and the speedup
    against the one seeds 1–2 measured."""
    from npd_core.bench import curves as cv  # scipy: not on a bare GPU box (``project``)

    table = bench["variants"]
    names = [n for n in ("npd", "sft", "onpolicy") if n in table]
    on = table["onpolicy"]

    def seed_curves(name: str, seeds: slice) -> list[list[tuple[float, float]]]:
        return [[(p["wall_s"], p["score"]) for p in c] for c in table[name]["seed_curves"][seeds]]

    later = slice(1, 3)
    if min(len(table[n]["seed_curves"]) for n in ("npd", "onpolicy")) < 2:
        final = float(np.mean(on["final_scores"]))
        start = on["seed_curves"][0][0]["score"]
        why = "needs seeds 1–2 of npd and onpolicy (run the bench with --seeds 3)"
        measured = cv.Speedup(None, start + TARGET * (final - start), None, None, why, TARGET)
    else:
        measured = cv.speedup(
            seed_curves("onpolicy", later), seed_curves("npd", later), TARGET,
            on["final_scores"][later],
        )  # fmt: skip
    out: dict[str, Any] = {"target_fraction": TARGET, "target_score": measured.target}
    # onpolicy gained nothing: its target is at or below the start, reached at no cost by all
    gained = measured.target > on["seed_curves"][0][0]["score"]
    for name in names:
        v = table[name]
        curve, totals = v["seed_curves"][0], v["seed_totals"][0]
        x, steps = (at_score(curve, measured.target, k) for k in ("teacher_tokens", "steps"))
        entry: dict[str, Any] = {"to_target": None}
        if gained and x is not None and steps is not None:
            counts = counts_at(name, curve, totals, x, steps)
            entry["to_target"] = {"counts": counts, **predict(name, counts, units, work)}
        entry["runs"] = [
            {
                "seed": i,
                "predicted": predict(name, counts_at(name, c, t, c[-1]["teacher_tokens"],
                                                     c[-1]["steps"]), units, work),
                "measured": {
                    "stage_seconds": {k: t["stage_seconds"].get(k, 0.0) for k in _stages(name)},
                    "clock_s": c[-1]["wall_s"],
                },
            }
            for i, (c, t) in enumerate(zip(v["seed_curves"], v["seed_totals"], strict=True))
            if i in (1, 2)
        ]  # fmt: skip
        out[name] = entry
    npd_t, on_t = out.get("npd", {}).get("to_target"), out["onpolicy"].get("to_target")
    defined = npd_t and on_t and npd_t["clock_s"] > 0 and on_t["clock_s"] > 0
    predicted = on_t["clock_s"] / npd_t["clock_s"] if defined else None  # as curves.speedup
    out["speedup"] = {
        "predicted": predicted,
        "measured_seeds_1_2": measured.value,
        "measured_reason": measured.reason,
        "relative_error": (
            predicted / measured.value - 1 if predicted and measured.value else None
        ),
        "within_tolerance": (
            abs(predicted / measured.value - 1) <= TOLERANCE
            if predicted and measured.value
            else None
        ),
        "tolerance": TOLERANCE,
    }
    out["bottleneck"] = {
        n: max(e["to_target"]["stage_seconds"].items(), key=lambda kv: kv[1])[0]
        for n in names
        if (e := out[n])["to_target"]
    }
    return out


def calibrate(bench: dict[str, Any], work: dict[str, Any]) -> dict[str, Any]:
    """Unit costs in ``measure_units``' format from the bench's own seed-0 runs: each stage's
    tokens over the seconds it recorded (generated tokens for decoding, teacher forward tokens
    for scoring, trained tokens for training), at the batch and thread count that run used.
    One batch size per run, so no per-step fixed cost is separated (``c0_s`` 0: it is in the
    rate at that batch). A stage that recorded no seconds or tokens has no rate."""
    table = bench["variants"]
    units: dict[str, Any] = {}

    def rate(name: str, stage: str, tokens_key: str) -> float | None:
        totals, end = table[name]["seed_totals"][0], table[name]["seed_curves"][0][-1]
        tokens = end.get("teacher_tokens") if tokens_key == "teacher" else totals[tokens_key]
        seconds = totals["stage_seconds"].get(stage, 0.0)
        return tokens / seconds if tokens and seconds > 0 else None

    def put(threads: Any, path: tuple[str, ...], value: float | None) -> None:
        if value is None:
            return
        node = units.setdefault(str(threads), {})
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node.setdefault(path[-1], value)  # the first run to measure a unit keeps it

    line = lambda r: {"c0_s": 0.0, "tokens_per_s": r} if r else None  # noqa: E731
    t_npd, t_base = work["threads"]["npd"], work["threads"]["baselines"]
    if "npd" in table:
        put(t_npd, ("decode", str(work["gen_batch"])), rate("npd", "generate", "generated_tokens"))
        put(t_npd, ("score_packed_tokens_per_s",), rate("npd", "score", "teacher"))
        put(
            t_npd,
            ("train_packed", str(work["npd_rows"])),
            line(rate("npd", "train", "train_tokens")),
        )
    if "sft" in table:
        put(t_base, ("teacher_decode_tokens_per_s",), rate("sft", "generate", "generated_tokens"))
        put(
            t_base,
            ("train_packed", str(work["sft_rows"])),
            line(rate("sft", "train", "train_tokens")),
        )
    if "onpolicy" in table:
        batch = str(work["onpolicy_prompts"] * work["n_per_prompt"])
        put(t_base, ("decode", batch), rate("onpolicy", "generate", "generated_tokens"))
        put(t_base, ("score_padded_tokens_per_s",), rate("onpolicy", "score", "teacher"))
        put(t_base, ("train_padded",), line(rate("onpolicy", "train", "train_tokens")))
    return units


def device_units(rep: dict[str, Any], rows: set[int]) -> dict[str, Any]:
    """The rates of a GPU bench report (``npd_core.bench.gpu``) in the cost model's units
    (``measure_units``): full rows only, so no per-step fixed cost is separated (``c0_s`` 0)."""
    op = rep["onpolicy_step"]
    train = {"c0_s": 0.0, "tokens_per_s": rep["train"]["best_tokens_per_s"]}
    return {
        "decode": {
            k: v["tokens_per_s"]
            for k, v in rep["generate"]["batches"].items()
            if "tokens_per_s" in v
        },
        "score_packed_tokens_per_s": rep["score"]["tokens_per_s"],
        "score_padded_tokens_per_s": op["train_tokens"] / op["teacher_score_s"],
        "train_packed": {str(r): train for r in rows},
        "train_padded": {"c0_s": 0.0, "tokens_per_s": op["train_tokens"] / op["student_update_s"]},
    }


def in_run(bench: dict[str, Any], gpu_bench: Path = GPU_BENCH) -> dict[str, Any]:
    """The cost model a bench reports about itself: unit costs calibrated from its seed-0 runs
    (:func:`calibrate`), the predicted speedup to 75% of onpolicy's gain, its comparison with
    what seeds 1–2 measured (when they exist) and the GPU projection (:func:`gpu_projection`)."""
    none = {"predicted_speedup_75": None, "predicted_vs_measured_75": None}
    table = bench["variants"]
    missing = [n for n in ("npd", "onpolicy") if n not in table]
    if missing:
        why = f"needs {' and '.join(missing)} in the bench"
        return {**none, "cost_model": {"available": False, "why": why}, "gpu_projection": None}
    if not all("steps" in p and "teacher_tokens" in p for n in ("npd", "onpolicy")
               for p in table[n]["seed_curves"][0]):  # fmt: skip
        why = "npd's and onpolicy's curves carry no teacher tokens or steps"
        return {**none, "cost_model": {"available": False, "why": why}, "gpu_projection": None}
    work = workload(bench)
    units = calibrate(bench, work)
    try:
        model = model_bench(bench, units, work)
    except KeyError as e:
        why = f"a stage recorded no seconds or tokens, so it has no unit cost: {e}"
        model = {"available": False, "why": why}
    s = model.get("speedup")
    return {
        "predicted_speedup_75": s["predicted"] if s else None,
        "predicted_vs_measured_75": s,
        "cost_model": {"units": units, "workload": work, **model},
        "gpu_projection": gpu_projection(bench, gpu_bench),
    }


def gpu_projection(bench: dict[str, Any], gpu_bench: Path = GPU_BENCH) -> dict[str, Any] | None:
    """:func:`project` with the unit costs a GPU bench measured (``docs/gpu-bench.json``: H100,
    a Qwen2.5-0.5B-shaped student and a 3B-shaped teacher), and the assumptions that takes;
    None when that file is absent."""
    if not gpu_bench.is_file():
        return None
    rep = json.loads(gpu_bench.read_text())
    work = workload(bench)
    units = device_units(rep, {work["npd_rows"], work["sft_rows"]})
    dev, gen = rep["device"], rep["generate"]
    return {
        **project(bench, units, work=work),
        "device": dev["name"],
        "units": units,
        "assumptions": [
            f"unit costs measured on {dev['name']} ({gpu_bench.name}): student shaped like "
            f"{dev['student']['like']}, teacher like {dev['teacher']['like']}, "
            f"{gen['prompt_len']}-token prompts and {gen['new_tokens']}-token answers",
            "sample efficiency from this bench's seed 0: teacher forward tokens and optimizer "
            "steps to 75% of onpolicy's gain, and its generated and trained tokens per token",
            "this bench's searched batches; decoding tokens/s linear in log batch between "
            "the measured sizes",
            "NPD's stages take turns on the one device (no overlap gain)",
            "no per-step fixed cost (full rows only were timed); filter, pack, evaluation and "
            "I/O left out",
        ],
    }


def cost_lines(rep: dict[str, Any]) -> list[str]:
    """The bench report's cost-model lines (80 columns): the in-run prediction against seeds
    1–2, then the GPU projection with its assumptions."""
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}×"  # noqa: E731
    lines = []
    pm = rep.get("predicted_vs_measured_75")
    if pm:
        err = pm["relative_error"]
        lines.append(
            f"predicted_speedup_75: {fmt(pm['predicted'])} (seeds 1–2 measured "
            f"{fmt(pm['measured_seeds_1_2'])}" + (f", {err:+.0%})" if err is not None else ")")
        )
    g = rep.get("gpu_projection")
    if g and g["speedup"] is not None:
        lines.append(f"projection to {g['device']} (not measured): {fmt(g['speedup'])}, assuming")
        lines += [f"  - {a}" for a in g["assumptions"]]
    return lines


def projection_target(bench: dict[str, Any]) -> tuple[float, float]:
    """(start, target) of :func:`project`: onpolicy's seed-0 start and ``TARGET`` of its seed-0
    gain. A target at or below the start (onpolicy gained nothing) has nothing to project."""
    on = bench["variants"]["onpolicy"]
    start = on["seed_curves"][0][0]["score"]
    return start, start + TARGET * (on["final_scores"][0] - start)


def project(
    bench: dict[str, Any],
    units: dict[str, Any],
    overlap_gain: float | None = None,
    work: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """NPD's and onpolicy's clocks to the target on another device: ``units`` (one set, in
    ``measure_units``' format, e.g. from the GPU bench) with the sample efficiency of ``bench``'s
    seed-0 curves, the target ``TARGET`` of onpolicy's gain on seed 0. ``overlap_gain`` None:
    NPD's stages share one device and run in turn (no overlap gain is assumed). ``work``:
    the batches, default ``workload(bench)``'s."""
    table = bench["variants"]
    work = {
        **(work or workload(bench)),
        "threads": {"npd": "device", "baselines": "device"},
        "overlap_gain": overlap_gain,
    }
    start, target = projection_target(bench)
    out: dict[str, Any] = {"target_fraction": TARGET, "target_score": target}
    for name in ("npd", "onpolicy"):
        curve, totals = table[name]["seed_curves"][0], table[name]["seed_totals"][0]
        x, steps = (at_score(curve, target, k) for k in ("teacher_tokens", "steps"))
        if target <= start or x is None or steps is None:  # no gain: nothing to project
            out[name] = None
            continue
        counts = counts_at(name, curve, totals, x, steps)
        out[name] = {"counts": counts, **predict(name, counts, {"device": units}, work)}
    ok = out["npd"] and out["onpolicy"] and out["npd"]["clock_s"] > 0
    out["speedup"] = out["onpolicy"]["clock_s"] / out["npd"]["clock_s"] if ok else None
    return out


def _stages(name: str) -> tuple[str, ...]:
    return ("generate", "train") if name == "sft" else ("generate", "score", "train")


def workload(bench: dict[str, Any]) -> dict[str, Any]:
    """What the units are measured at, from the bench JSON: the world's mean lengths, each
    method's searched batch, the stages' thread counts and the probe's overlap gain."""
    cfg, grid, table = bench["config"], bench["grid"], bench["variants"]
    chosen = grid["chosen"]
    npd_settings = table["npd"]["settings"][0]
    threads = npd_settings["threads"]
    cal = bench["calibration"].get(str(chosen["npd"]["rows_per_step"]), {}).get(str(threads), {})
    sft = table.get("sft")
    teacher_resp = (
        sft["seed_totals"][0]["generated_tokens"] / bench["train_prompts"]
        if sft
        else grid["base_lengths"]["response_tokens"]
    )
    staleness = cfg["staleness"] > 0 and cfg.get("overlap", True)
    return {
        "prompt_tokens": grid["base_lengths"]["prompt_tokens"],
        "response_tokens": grid["base_lengths"]["response_tokens"],
        "teacher_response_tokens": teacher_resp,
        "gen_batch": cfg["generate"]["batch_size"],
        "n_per_prompt": cfg["generate"]["n_per_prompt"],
        "onpolicy_prompts": chosen["onpolicy"]["prompts_per_step"],
        "npd_rows": chosen["npd"]["rows_per_step"],
        "sft_rows": chosen.get("sft", chosen["npd"])["rows_per_step"],
        "row_tokens": cfg["pack"]["max_seq_len"],
        "top_k": cfg["score"]["top_k"],
        "score_batch_tokens": cfg["score"]["batch_tokens"],
        # the baselines run one stage at a time on every core, unless the config pins threads
        "threads": {"npd": threads, "baselines": cfg.get("threads") or os.cpu_count() or 1},
        "overlap_gain": cal.get("overlap_gain") if staleness else None,
    }


# ---------------------------------------------------------------- unit costs (measured)
def measure_units(
    bench: dict[str, Any], log: Callable[[str], None] = lambda m: None
) -> dict[str, Any]:
    """Unit costs at ``workload(bench)`` on this device, by thread count, with the bench's
    teacher and θ_0 on its training prompts: decoding runs to the real EOS at the run's
    temperature (so a batch pays for its longest answer, as the stages do), and θ_0's own
    answers are what the teacher scores and the learner steps on."""
    import torch

    from npd_core.config import NPDConfig
    from npd_core.data import read_prompts
    from npd_core.method.train import make_optimizer
    from npd_core.models import format_prompts, frozen_dtype, load_model, load_tokenizer
    from npd_core.pipeline.kernels import choose_attention
    from npd_core.pipeline.spec import RunSpec

    work = workload(bench)
    cfg = NPDConfig.model_validate(bench["config"])
    paths = bench["paths"]
    spec = choose_attention(
        RunSpec(bench["out"], "cost", bench["config"], paths["teacher"], paths["student"],
                paths["train_prompts"], paths["eval_prompts"]),
        log=log,
    )  # fmt: skip
    tok = load_tokenizer(paths["student"])
    texts = [p.prompt for p in read_prompts(paths["train_prompts"])]
    prompts = format_prompts(tok, texts, cfg.data.chat_template)
    prompts = (prompts * math.ceil(max(BATCHES) / len(prompts)))[: max(BATCHES)]
    frozen = frozen_dtype(cfg.models.frozen_dtype)
    student, teacher = load_model(paths["student"], frozen), load_model(paths["teacher"], frozen)
    out: dict[str, Any] = {"workload": work, "attention": spec.attention}
    for threads in sorted({work["threads"]["npd"], work["threads"]["baselines"]}):
        torch.set_num_threads(threads)
        u: dict[str, Any] = {"decode": {}}
        for b in BATCHES:
            u["decode"][str(b)], pool = _decode_rate(student, prompts[:b], cfg, tok, greedy=False)
            log(f"cost: {threads} threads, decode batch {b}: {u['decode'][str(b)]:.0f} tok/s")
        u["teacher_decode_tokens_per_s"], _ = _decode_rate(
            teacher, prompts[: work["gen_batch"]], cfg, tok, greedy=True
        )
        u["score_packed_tokens_per_s"] = _packed_score_rate(
            teacher, pool[:SCORE_SAMPLES], work, spec.kernel("score_teacher"), cfg
        )
        u["score_padded_tokens_per_s"] = _padded_score_rate(teacher, pool, work, cfg)
        learner = load_model(paths["student"])  # fp32 master weights, as the learners'
        opt = make_optimizer(learner, cfg.train)
        u["train_packed"] = {
            str(r): _step_line(learner, opt, cfg, pool, work, rows=r, kernel=spec.kernel("train"))
            for r in sorted({work["npd_rows"], work["sft_rows"]})
        }
        u["train_padded"] = _step_line(learner, opt, cfg, pool, work, rows=None, kernel="sdpa")
        out[str(threads)] = u
    return out


def _decode_rate(
    model: Any, prompts: list[list[int]], cfg: Any, tok: Any, greedy: bool
) -> tuple[float, list[Any]]:
    """Generated tokens/s of one batch of ``prompts`` (after a short warm-up), and its samples."""
    from npd_core.method.generate import generate
    from npd_core.method.packing import Sample
    from npd_core.models import use_bf16

    g = cfg.generate
    kw = dict(
        n_per_prompt=1, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
        temperature=0.0 if greedy else g.temperature, top_p=g.top_p,
        seeds=None if greedy else [[i] for i in range(len(prompts))],
        batch_size=len(prompts), bf16=use_bf16(cfg.models.bf16),
        halve_on_oom=False,  # the rate of this batch size or none
    )  # fmt: skip
    generate(model, prompts, max_new_tokens=2, **kw)  # warm-up at this batch's shapes
    t0 = time.perf_counter()
    gens = generate(model, prompts, max_new_tokens=g.max_new_tokens, **kw)
    seconds = time.perf_counter() - t0
    samples = [Sample(p, x[0].token_ids) for p, x in zip(prompts, gens, strict=True)]
    return sum(len(s.response_ids) for s in samples) / seconds, samples


def _packed_score_rate(
    teacher: Any, samples: list[Any], work: dict[str, Any], kernel: str | None, cfg: Any
) -> float:
    """Teacher tokens/s of NPD's score stage (``method.score``, conditional view, top-k)."""
    from npd_core.method.attention import packed_attention
    from npd_core.method.score import score
    from npd_core.models import use_bf16

    prompts, resps = [s.prompt_ids for s in samples], [s.response_ids for s in samples]
    kw = dict(view=None, top_k=work["top_k"], batch_tokens=work["score_batch_tokens"],
              bf16=use_bf16(cfg.models.bf16))  # fmt: skip
    with packed_attention(teacher, kernel):
        score(teacher, prompts[:8], resps[:8], **kw)  # warm-up
        t0 = time.perf_counter()
        score(teacher, prompts, resps, **kw)
        seconds = time.perf_counter() - t0
    return (sum(map(len, prompts)) + sum(map(len, resps))) / seconds


def _padded_score_rate(teacher: Any, pool: list[Any], work: dict[str, Any], cfg: Any) -> float:
    """Teacher tokens/s of on-policy's per-step forward (``teacher_topk``): its batch of θ_0's
    samples, one a padded row."""
    from npd_core.baselines.onpolicy import teacher_topk
    from npd_core.models import use_bf16

    bf16 = use_bf16(cfg.models.bf16)
    n = work["onpolicy_prompts"] * work["n_per_prompt"]
    tokens = seconds = 0.0
    for j in range(TIMED_STEPS + 1):
        batch, offsets = _padded(pool, n, j)
        t0 = time.perf_counter()
        teacher_topk(teacher, batch, offsets, work["top_k"], bf16)
        if j:  # the first is a warm-up
            seconds += time.perf_counter() - t0
            tokens += batch.n_real_tokens
    return tokens / seconds


def _padded(pool: list[Any], n: int, j: int) -> tuple[Any, list[int]]:
    """The ``j``-th on-policy batch of ``n`` samples from ``pool``, one sample a padded row."""
    from npd_core.method.packing import collate, response_offsets

    samples = [pool[(j * n + i) % len(pool)] for i in range(n)]
    offsets = response_offsets(samples)
    return collate(samples, [[i] for i in range(n)], 0, target_offsets=offsets), offsets


def _step_line(
    model: Any, opt: Any, cfg: Any, pool: list[Any], work: dict[str, Any], rows: int | None,
    kernel: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Seconds per training step as ``c0 + tokens / rate``, fitted to steps at the variant's
    batch and at a quarter of it: ``rows`` packed rows of ``row_tokens`` (BFD, as the pack
    stage), or (None) on-policy's padded batch. Random top-k targets: a step's cost does not
    depend on their values."""
    import torch

    from npd_core.method.attention import packed_attention
    from npd_core.method.train import Targets, optimizer_step
    from npd_core.models import use_bf16

    full = rows or work["onpolicy_prompts"] * work["n_per_prompt"]
    g = torch.Generator().manual_seed(0)
    points = []
    for size in sorted({max(1, full // 4), full}):
        times, tokens = [], []
        for j in range(TIMED_STEPS + 1):
            if rows is None:
                batch, offsets = _padded(pool, size, j)
            else:
                batch, offsets = _packed_rows(pool, size, work["row_tokens"], j)
            m = int(batch.target_index.max()) + 1  # the table rows the batch reads
            tgt = Targets(
                torch.randint(0, model.config.vocab_size, (m, work["top_k"]), generator=g),
                torch.log_softmax(torch.randn(m, work["top_k"], generator=g), -1),
                offsets,
            )
            model.train()
            with packed_attention(model, kernel):
                t0 = time.perf_counter()
                optimizer_step(model, opt, batch, tgt, cfg.train, lr=1e-6, step=j,
                               bf16=use_bf16(cfg.models.bf16), padded=rows is None)  # fmt: skip
                if j:
                    times.append(time.perf_counter() - t0)
                    tokens.append(batch.n_real_tokens)
        points.append((float(np.mean(tokens)), float(np.median(times))))
    (t1, s1), (t2, s2) = points[0], points[-1]
    if t2 > t1 and s2 > s1:
        rate = (t2 - t1) / (s2 - s1)
        c0 = max(0.0, s2 - t2 / rate)
    else:  # one size only, or noise: all of it per token
        rate, c0 = t2 / s2, 0.0
    return {"c0_s": c0, "tokens_per_s": rate, "points": points}


def _packed_rows(pool: list[Any], rows: int, row_tokens: int, j: int) -> tuple[Any, list[int]]:
    """``rows`` BFD-packed rows of ``row_tokens`` from ``pool`` (the ``j``-th draw)."""
    from npd_core.method.packing import collate, pack, response_offsets

    mean = float(np.mean([len(s) for s in pool]))
    n = min(len(pool), math.ceil(1.2 * rows * row_tokens / mean))
    samples = [pool[(j * n + i) % len(pool)] for i in range(n)]
    samples = [s for s in samples if len(s) <= row_tokens]
    offsets = response_offsets(samples)
    lay = pack([len(s) for s in samples], row_tokens, "bfd", j)
    lay.sort(key=lambda r: -sum(len(samples[i]) for i in r))  # the fullest rows
    return collate(samples, lay[:rows], 0, row_len=row_tokens, target_offsets=offsets), offsets


# ---------------------------------------------------------------- the command
def localize(bench_path: Path, world: str, out: Path, log: Callable[[str], None]) -> Path:
    """A copy of the bench JSON in ``out`` that the unit costs can run from here: with ``out``
    as its output directory and, when the bench ran elsewhere, this machine's copy of its
    embedded ``world`` (the same digest)."""
    from npd_core.toy.world import build_toy_world, world_spec

    report = json.loads(bench_path.read_text())
    if not all(Path(p).exists() for p in report["paths"].values()):
        built = build_toy_world(out / "toy", world_spec(world), log=log)
        keys = ("teacher", "student", "train_prompts", "eval_prompts")
        report["paths"] = {k: str(getattr(built, k)) for k in keys}
    report["out"] = str(out.resolve())
    local = out / f".cost-{bench_path.stem}.json"
    out.mkdir(parents=True, exist_ok=True)
    local.write_text(json.dumps(report))
    return local


def run(bench_path: Path, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Measure the units in a process of its own (``--units-only``), then model ``bench``."""
    bench = json.loads(bench_path.read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "npd_core.bench.cost", "--bench", str(bench_path), "--units-only"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cost: the unit-cost process failed: {tail}")
    units = json.loads(proc.stdout)
    return {
        "bench": str(bench_path),
        "units": units,
        **model_bench(bench, units, units["workload"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m npd_core.bench.cost", description=__doc__)
    ap.add_argument("--bench", type=Path, required=True, help="an `npd bench` JSON file")
    ap.add_argument("--units-only", action="store_true", help="measure and print the units")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args(argv)

    def log(m: str) -> None:
        print(m, file=sys.stderr)

    if a.units_only:
        print(json.dumps(measure_units(json.loads(a.bench.read_text()), log)))
        return 0
    res = run(a.bench, log)
    print(json.dumps(res, indent=1) if a.json else summary(res))
    return 0


def summary(res: dict[str, Any]) -> str:
    """The prediction in a few lines (80 columns)."""
    s = res["speedup"]
    lines = [f"target: {res['target_score']:.1f} ({res['target_fraction']:.0%} of onpolicy's gain)"]
    for name in ("npd", "sft", "onpolicy"):
        e = res.get(name)
        if not e or not e["to_target"]:
            continue
        st = e["to_target"]["stage_seconds"]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in st.items())
        lines.append(f"{name:9s} {e['to_target']['clock_s']:6.1f} s to target ({parts})")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}×"  # noqa: E731
    lines.append(
        f"speedup predicted {fmt(s['predicted'])}, measured (seeds 1–2) "
        f"{fmt(s['measured_seeds_1_2'])}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
