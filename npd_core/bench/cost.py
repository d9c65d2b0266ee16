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
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from npd_core.bench.units import decode_rate, measure_units, workload

TARGET = 0.75  # of onpolicy's gain: the speedup the model is validated on
TOLERANCE = 0.25  # predicted speedup within ±25% of the measured one
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
