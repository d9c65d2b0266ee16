"""The gate checks a world passes before any method is compared on it (the views world's M1-M4).

A bench can only show what its world lets it show: NPD's case is on-policy quality at a
fraction of on-policy's cost, which needs a world where student decoding dominates an on-policy
step (M1), where the teacher is good and the student has room below it (M2), where the teacher
still gives useful targets on the student's own imperfect answers (M3), and where the student's
samples are well formed (M4). Each check is a number against a threshold fixed here before the
world was built:

- M1: student decoding ≥ 50% of one synchronous on-policy step (the loop body of
  ``baselines.onpolicy``, ``world_search.onpolicy_step_times``) at every batch of the bench's
  onpolicy grid, median of ``M1_STEPS`` steps at 2 threads, with the built models.
- M2: the teacher ≥ 90% per line on held-out; the student's SFT on true answers (its warm start)
  plateaus ≥ 30 points above its start (the untrained student) and ≥ 15 below the teacher, and
  has flattened (its last quarter of steps gained < 2 points).
- M3: 256 of θ₀'s temperature-1 samples, cut after a random number of their lines; the teacher
  continues each greedily; its per-line accuracy on the remaining lines is within 10 points of
  its own on the same lines from the prompt.
- M4: ≥ 90% of θ₀'s temperature-1 samples finish (EOS), their mean length within 10% of the
  true answers'.

    python -m npd_core.toy.gates --world views --build --out npd-out   # build, curves logged
    python -m npd_core.toy.gates --world views --out npd-out --json    # M1-M4 → JSON

``--build`` builds the world as ``npd demo --world views`` does (same cache, same models) and
logs both models' held-out curves to ``<out>/toy/<world>-<digest>.curves.jsonl`` (M2 reads the
student's from there). ``--set FIELD=VALUE …`` builds and checks a candidate spec instead
(``--set student_fit=1000 student.hidden=64``), its own digest. Not part of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from npd_core.bench.search import GRID, base_hyper
from npd_core.config import NPDConfig
from npd_core.data import Prompt, read_prompts
from npd_core.method.answers import exact, lines, metric_fn
from npd_core.method.attention import packed_attention
from npd_core.method.evaluate import greedy_responses
from npd_core.method.generate import generate
from npd_core.models import format_prompts, load_model, load_tokenizer
from npd_core.seeds import seed_for
from npd_core.store import Store
from npd_core.toy import smol
from npd_core.toy.task import build_tokenizer
from npd_core.toy.world import WORLDS, ToyWorld, WorldSpec, build_toy_world, world_spec
from npd_core.toy.world_search import onpolicy_step_times

# thresholds (points, shares), fixed before the views world was built
M1_MIN_DECODE_SHARE = 0.50
M1_STEPS = 3
M1_THREADS = 2
M2_MIN_TEACHER = 90.0
M2_MIN_SFT_GAIN = 30.0
M2_MIN_GAP = 15.0
M2_MAX_LAST_QUARTER_GAIN = 2.0
M3_SAMPLES = 256
M3_MAX_DROP = 10.0
M4_MIN_FINISHED = 0.90
M4_MAX_LENGTH_ERROR = 0.10
CURVE_LOCK = threading.Lock()  # the curve file's writers: a build's two training threads
CURVE_EVERY = 250  # steps between the curves' held-out evaluations (--build)
CURVE_PROMPTS = 500  # prompts per curve evaluation
# the smol world (a pretrained teacher, one-sentence answers graded by smol.ANSWER_REGEX), fixed
# before its warm-up rule was chosen: M2 asks its student's SFT on the teacher's answers to
# rise ≥ 10 points above the pruned model and end ≥ 15 below the teacher (each task was picked
# at ≥ 50% for it); M3 and M4 as above on θ₀'s samples at the world's sampling temperature,
# cuts before the answer and the teacher's greedy answers as the reference length; M1 is the
# views world's alone
S2_MIN_SFT_GAIN = 10.0
S2_MIN_GAP = 15.0
SMOL_CURVE_EVERY = 50
SMOL_CURVE_PROMPTS = 200


@dataclass(frozen=True)
class Graded:
    """Per-line and whole-answer scores in points, and each response's line matches."""

    lines: float
    exact: float
    line_hits: list[list[bool]]  # (N, lines of the reference)


def grade(texts: list[str], answers: list[str]) -> Graded:
    """``eval.metric: lines`` and ``exact`` of ``texts``, with each line's match kept."""
    hits = [_line_hits(t, a) for t, a in zip(texts, answers, strict=True)]
    n = max(1, len(texts))
    return Graded(
        100.0 * sum(lines(t, a) for t, a in zip(texts, answers, strict=True)) / n,
        100.0 * sum(exact(t, a) for t, a in zip(texts, answers, strict=True)) / n,
        hits,
    )


def _line_hits(text: str, answer: str) -> list[bool]:
    want = answer.strip("\n").split("\n")
    got = text.strip("\n").split("\n")
    return [i < len(got) and lines(got[i], want[i]) == 1.0 for i in range(len(want))]


def greedy_texts(model, tok, prompt_ids: list[list[int]], cap: int) -> list[str]:
    resp = greedy_responses(model, tok, prompt_ids, max_new_tokens=cap, batch_size=256, bf16=False)
    return [tok.decode(r, skip_special_tokens=True) for r in resp]


def continue_greedily(
    model, tok, prompt_ids: list[list[int]], prefixes: list[list[int]], cap: int, batch_size=256
) -> list[str]:
    """Each prompt with its prefix in the context, continued greedily: the prefix and the
    continuation as one text (M3's cuts, and the views student's exposure probe)."""
    cont = greedy_responses(
        model,
        tok,
        [i + p for i, p in zip(prompt_ids, prefixes, strict=True)],
        max_new_tokens=cap,
        batch_size=batch_size,
        bf16=False,
    )
    return [
        tok.decode(p + c, skip_special_tokens=True) for p, c in zip(prefixes, cont, strict=True)
    ]


def sample(
    model, tok, prompt_ids: list[list[int]], cap: int, seed: int, temperature: float = 1.0
) -> list[Any]:
    """One sample per prompt (``Generation``s) at ``temperature``, seeded per prompt."""
    gens = generate(
        model,
        prompt_ids,
        n_per_prompt=1,
        max_new_tokens=cap,
        eos_ids={tok.eos_token_id},
        pad_id=tok.pad_token_id,
        temperature=temperature,
        top_p=1.0,
        seeds=[[seed_for(seed, "gates", None, i)] for i in range(len(prompt_ids))],
        batch_size=256,
        bf16=False,
    )
    return [g[0] for g in gens]


def length_check(gens: list[Any], true_tokens: list[int]) -> dict[str, Any]:
    """M4: the share of samples that finished and their mean length (EOS included) against
    the true answers' (EOS included)."""
    finished = sum(g.finished for g in gens) / len(gens)
    mean_len = statistics.mean(len(g.token_ids) for g in gens)
    true_len = statistics.mean(true_tokens)
    error = mean_len / true_len - 1.0
    return {
        "finished": round(finished, 4),
        "mean_sample_tokens": round(mean_len, 2),
        "mean_true_tokens": round(true_len, 2),
        "length_error": round(error, 4),
        "pass": finished >= M4_MIN_FINISHED and abs(error) <= M4_MAX_LENGTH_ERROR,
    }


def cut_points(gens: list[Any], newline_id: int, n_lines: int, seed: int) -> list[int | None]:
    """For each sample, how many of its tokens the teacher is given: the sample up to and
    including its ``c``-th newline, ``c`` uniform in 1 … min(its complete lines, n_lines − 1);
    None for a sample without a complete line."""
    rng = random.Random(seed)
    out: list[int | None] = []
    for g in gens:
        ends = [i + 1 for i, t in enumerate(g.token_ids) if t == newline_id][: n_lines - 1]
        out.append(ends[rng.randint(1, len(ends)) - 1] if ends else None)
    return out


def off_path(
    own: list[list[bool]], continued: list[list[bool]], kept_lines: list[int]
) -> dict[str, Any]:
    """M3: the teacher's per-line accuracy on the lines after each cut, continuing the
    student's prefix (``continued``) against its own answer from the prompt (``own``), pooled
    over every remaining line."""
    after = [(o[k:], c[k:]) for o, c, k in zip(own, continued, kept_lines, strict=True)]
    n = sum(len(o) for o, _ in after)
    own_acc = 100.0 * sum(sum(o) for o, _ in after) / n
    cont_acc = 100.0 * sum(sum(c) for _, c in after) / n
    return {
        "remaining_lines": n,
        "teacher_from_prompt": round(own_acc, 2),
        "teacher_off_path": round(cont_acc, 2),
        "drop": round(own_acc - cont_acc, 2),
        "pass": own_acc - cont_acc <= M3_MAX_DROP,
    }


def sft_plateau(curve: list[dict], teacher: float, student: float) -> dict[str, Any]:
    """M2 from the build: the teacher's held-out score, and the student's warm-start curve
    (``step``, ``lines`` on held-out prompts it never trained on) from step 0 to its last."""
    start, last = curve[0], curve[-1]
    quarter = [p for p in curve if p["step"] <= 0.75 * last["step"]][-1]
    gain_last_quarter = last["lines"] - quarter["lines"]
    checks = {
        "teacher": teacher >= M2_MIN_TEACHER,
        "sft_gain": last["lines"] - start["lines"] >= M2_MIN_SFT_GAIN,
        "gap": teacher - student >= M2_MIN_GAP,
        "flat": gain_last_quarter < M2_MAX_LAST_QUARTER_GAIN,
    }
    return {
        "teacher_lines": round(teacher, 2),
        "student_lines": round(student, 2),
        "student_curve_start": round(start["lines"], 2),
        "student_curve_end": round(last["lines"], 2),
        "student_gain_last_quarter": round(gain_last_quarter, 2),
        "checks": checks,
        "pass": all(checks.values()),
    }


def onpolicy_batches(spec: WorldSpec, prompt_tokens: float, response_tokens: float) -> list[int]:
    """The prompts per step of the bench's onpolicy grid on this world's config defaults,
    sized from θ₀'s own response length as the bench sizes it."""
    cfg = NPDConfig.model_validate(spec.config_defaults())
    base = base_hyper(cfg, prompt_tokens, response_tokens).prompts_per_step
    return sorted({max(1, round(base * m)) for m in GRID["batch"]}, reverse=True)


def student_curve_of(curve_file: Path) -> list[dict]:
    """The student's rows of a build's curve file (``--build``; none without the file): what M2
    reads."""
    if not curve_file.is_file():
        return []
    rows = [json.loads(x) for x in curve_file.read_text().splitlines()]
    return [r for r in rows if r["model"] == "student"]


def no_curve(curve_file: Path) -> dict[str, Any]:
    return {"pass": None, "why": f"no curve in {curve_file}: build with --build"}


def run_gates(world: ToyWorld, spec: WorldSpec, curve_file: Path, log=print) -> dict[str, Any]:
    """M1-M4 on a built world; a JSON-ready report."""
    tok = load_tokenizer(world.student)
    cap = spec.max_new_tokens
    held = read_prompts(world.eval_prompts)
    ids = [tok(p.prompt)["input_ids"] for p in held]
    answers = [p.answer for p in held]
    true_tokens = [len(tok(spec.response_text(a))["input_ids"]) + 1 for a in answers]
    report: dict[str, Any] = {"world": spec.prefix, "digest": spec.digest(), "spec": asdict(spec)}
    report["build"] = {k: world.meta[k] for k in ("teacher", "student", "build_s")}
    report["machine"] = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    t0 = time.time()

    log("gates: greedy answers of teacher and student on the held-out prompts")
    teacher, student = load_model(world.teacher), load_model(world.student)
    t_graded = grade(greedy_texts(teacher, tok, ids, cap), answers)
    s_graded = grade(greedy_texts(student, tok, ids, cap), answers)
    report["held_out"] = {
        "prompts": len(held),
        "teacher": {"lines": round(t_graded.lines, 2), "exact": round(t_graded.exact, 2)},
        "student": {"lines": round(s_graded.lines, 2), "exact": round(s_graded.exact, 2)},
    }

    log("gates: M4 θ₀'s temperature-1 samples")
    gens = sample(student, tok, ids, cap, spec.seed)
    report["M4"] = length_check(gens, true_tokens)
    texts = [tok.decode(g.token_ids, skip_special_tokens=True) for g in gens]
    report["M4"]["sample_lines"] = round(grade(texts, answers).lines, 2)

    log("gates: M3 the teacher continues θ₀'s samples cut at a random line")
    newline = tok("\n")["input_ids"][0]
    n_lines = len(answers[0].split("\n"))
    first = gens[:M3_SAMPLES]
    cuts = cut_points(first, newline, n_lines, spec.seed)
    use = [i for i, c in enumerate(cuts) if c is not None]
    prefixes = [first[i].token_ids[: cuts[i]] for i in use]
    joined = continue_greedily(teacher, tok, [ids[i] for i in use], prefixes, cap)
    kept = [sum(t == newline for t in p) for p in prefixes]
    continued = grade(joined, [answers[i] for i in use]).line_hits
    report["M3"] = off_path([t_graded.line_hits[i] for i in use], continued, kept)
    wrong = [
        any(not h for h in s_hits[:k])
        for s_hits, k in zip(
            grade([texts[i] for i in use], [answers[i] for i in use]).line_hits, kept, strict=True
        )
    ]
    report["M3"] |= {
        "samples": len(use),
        "without_a_line": len(first) - len(use),
        "prefixes_with_a_wrong_line": round(sum(wrong) / len(use), 4),
    }
    del teacher, student

    log("gates: M1 one synchronous on-policy step, phase by phase")
    prompt_tokens = statistics.mean(len(x) for x in ids)
    batches = onpolicy_batches(spec, prompt_tokens, report["M4"]["mean_sample_tokens"])
    train = read_prompts(world.train_prompts)
    steps = [
        onpolicy_step_times(
            str(world.teacher),
            str(world.student),
            train,
            b,
            steps=M1_STEPS,
            max_new_tokens=cap,
            threads=M1_THREADS,
        )
        for b in batches
    ]
    shares = [s["share"]["generate"] for s in steps]
    report["M1"] = {
        "batches": batches,
        "steps": steps,
        "decode_share": shares,
        "pass": min(shares) >= M1_MIN_DECODE_SHARE,
    }
    torch.set_num_threads(M1_THREADS)

    student_curve = student_curve_of(curve_file)
    if student_curve:
        report["M2"] = sft_plateau(student_curve, world.teacher_score, world.student_score)
        report["M2"]["curve"] = student_curve
    else:
        report["M2"] = no_curve(curve_file)
    report["machine"]["load_after"] = os.getloadavg()
    report["gates_s"] = round(time.time() - t0, 1)
    report["passed"] = {m: report[m]["pass"] for m in ("M1", "M2", "M3", "M4")}
    return report


def answer_cut(tok, token_ids: list[int], rng: random.Random) -> int:
    """How many of a sample's tokens the teacher is given in the smol world's M3: a uniform
    count that stops before the token where the answer ``smol.ANSWER_REGEX`` reads begins (the
    whole sample but its last token when it has no answer)."""
    text = tok.decode(token_ids, skip_special_tokens=True)
    m = re.search(smol.ANSWER_REGEX, text)
    end = len(token_ids)
    if m is not None:
        end = next(
            k
            for k in range(1, len(token_ids) + 1)
            if len(tok.decode(token_ids[:k], skip_special_tokens=True)) > m.start(1)
        )
    return rng.randint(1, max(1, end - 1))


def _by_task(held: list[Prompt], own: list[float], cont: list[float]) -> dict[str, Any]:
    """M3 per task (``smol.task_of``): which questions the cuts derail."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(held):
        groups.setdefault(smol.task_of(p), []).append(i)
    out: dict[str, Any] = {}
    for task, at in sorted(groups.items()):
        a, c = (100 * statistics.mean(x[i] for i in at) for x in (own, cont))
        out[task] = {
            "samples": len(at),
            "teacher_from_prompt": round(a, 2),
            "teacher_off_path": round(c, 2),
            "drop": round(a - c, 2),
        }
    return out


def run_smol_gates(
    world: ToyWorld,
    spec: smol.SmolSpec,
    curve_file: Path,
    log=print,
    temperature: float | None = None,
) -> dict[str, Any]:
    """M2-M4 of the smol world on ``M3_SAMPLES`` held-out prompts; a JSON-ready report. θ₀ samples
    at the temperature the world's runs sample at (``spec.temperature``), since M3 and M4 ask
    about the samples a run trains on; ``temperature`` checks a candidate one instead."""
    temp = spec.temperature if temperature is None else temperature
    tok = load_tokenizer(world.student)
    cap = spec.max_new_tokens
    held = read_prompts(world.eval_prompts)[:M3_SAMPLES]
    ids = format_prompts(tok, [p.prompt for p in held], "auto")
    score = metric_fn("regex", smol.ANSWER_REGEX)
    report: dict[str, Any] = {"world": spec.prefix, "spec": asdict(spec), "temperature": temp}
    report["build"] = {k: world.meta[k] for k in ("teacher", "student", "build_s")}
    t0 = time.time()
    log(f"gates: the teacher's greedy answers and θ₀'s samples at temperature {temp}")
    teacher, student = load_model(world.teacher), load_model(world.student)
    own = greedy_responses(teacher, tok, ids, max_new_tokens=cap, batch_size=64, bf16=False)
    own_hits = [score(tok.decode(r), p.answer) for r, p in zip(own, held, strict=True)]
    gens = sample(student, tok, ids, cap, spec.seed, temp)
    report["M4"] = length_check(gens, [len(r) + 1 for r in own])
    log("gates: M3 the teacher continues θ₀'s samples cut before their answer")
    rng = random.Random(spec.seed)
    prefixes = [g.token_ids[: answer_cut(tok, g.token_ids, rng)] for g in gens]
    texts = continue_greedily(teacher, tok, ids, prefixes, cap, batch_size=64)
    hits = [score(t, q.answer) for t, q in zip(texts, held, strict=True)]
    own_acc, cont_acc = 100 * statistics.mean(own_hits), 100 * statistics.mean(hits)
    report["M3"] = {
        "samples": len(held),
        "teacher_from_prompt": round(own_acc, 2),
        "teacher_off_path": round(cont_acc, 2),
        "drop": round(own_acc - cont_acc, 2),
        "pass": own_acc - cont_acc <= M3_MAX_DROP,
        "by_task": _by_task(held, own_hits, hits),
    }
    curve = student_curve_of(curve_file)
    if curve:
        start, last = curve[0]["score"], curve[-1]["score"]
        checks = {
            "teacher": world.teacher_score >= 50.0,
            "sft_gain": last - start >= S2_MIN_SFT_GAIN,
            "gap": world.teacher_score - world.student_score >= S2_MIN_GAP,
        }
        report["M2"] = {
            "teacher": world.teacher_score,
            "student": world.student_score,
            "student_curve_start": start,
            "student_curve_end": last,
            "checks": checks,
            "pass": all(checks.values()),
            "curve": curve,
        }
    else:
        report["M2"] = no_curve(curve_file)
    report["gates_s"] = round(time.time() - t0, 1)
    report["passed"] = {m: report[m]["pass"] for m in ("M2", "M3", "M4")}
    return report


def curve_hook(
    curve_file: Path,
    t0: float,
    name: str,
    model,
    measure: Callable[[], dict],
    every: int,
    steps: int,
) -> Callable:
    """A build's ``on_step`` that logs ``measure()`` (the model in eval mode, with its own
    attention, which generation needs) to ``curve_file`` before the first step, every ``every``
    steps and after the last of ``steps``."""

    def point(step: int) -> None:
        was = model.training
        model.eval()
        with packed_attention(model, "sdpa"):
            measured = measure()
        model.train(was)
        row = {"model": name, "step": step, "s": round(time.time() - t0)} | measured
        with CURVE_LOCK, curve_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    drop_curve(curve_file, name)
    point(0)

    def on_step(entry) -> None:
        if (entry.step + 1) % every == 0 or entry.step + 1 == steps:
            point(entry.step + 1)

    return on_step


def drop_curve(curve_file: Path, name: str) -> None:
    """Remove ``name``'s rows from ``curve_file``: its training starts again from step 0, and a
    build killed part-way must not leave its points (or a torn last line) in the new curve."""
    with CURVE_LOCK:  # the teacher and student may train side by side, in threads
        if curve_file.is_file():
            curve_file.write_text("".join(_rows_but(curve_file, name)))


def _rows_but(curve_file: Path, name: str) -> list[str]:
    keep = []
    for line in curve_file.read_text().splitlines():
        try:
            if json.loads(line)["model"] != name:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError):
            continue
    return keep


def watch_smol(spec: smol.SmolSpec, curve_file: Path, t0: float):
    """The smol build's ``watch``: the student's held-out score (``SMOL_CURVE_PROMPTS``
    prompts) every ``SMOL_CURVE_EVERY`` warm-up steps and before the first."""

    def watch(name: str, model, held: list[Prompt], tok):
        prompts = held[:SMOL_CURVE_PROMPTS]

        def measure() -> dict:
            return {"score": smol.score(model, tok, prompts, spec)[0]}

        return curve_hook(curve_file, t0, name, model, measure, SMOL_CURVE_EVERY, spec.warm_steps)

    return watch


def watch_curves(spec: WorldSpec, curve_file: Path, train: list[Prompt], t0: float):
    """``build_toy_world``'s ``watch``: per-line and exact scores every ``CURVE_EVERY`` steps
    and before the first; the student's on train prompts (it never fits them), the teacher's on
    the held-out ones."""

    tok = build_tokenizer()

    def watch(name: str, model, held: list[Prompt]):
        prompts = (train if name == "student" else held)[:CURVE_PROMPTS]
        ids = [tok(p.prompt)["input_ids"] for p in prompts]

        def measure() -> dict:
            g = grade(
                greedy_texts(model, tok, ids, spec.max_new_tokens), [p.answer for p in prompts]
            )
            return {"lines": g.lines, "exact": g.exact}

        steps = (spec.teacher if name == "teacher" else spec.student).train_steps
        return curve_hook(curve_file, t0, name, model, measure, CURVE_EVERY, steps)

    return watch


def copy_reused_curves(world: ToyWorld, curve_file: Path) -> None:
    """A model the build reused from a twin world (``reused_from``) was not trained, so its
    curve (M2 reads the student's) is copied from that world's curve file."""
    for name in ("teacher", "student"):
        twin = world.meta[name].get("reused_from")
        source = curve_file.parent / f"{twin}.curves.jsonl"
        if twin and source.is_file():
            drop_curve(curve_file, name)  # a rebuild's second copy, or a killed build's rows
            rows = [x for x in source.read_text().splitlines() if json.loads(x)["model"] == name]
            with curve_file.open("a") as f:
                f.writelines(x + "\n" for x in rows)


def with_fields(spec: WorldSpec, pairs: list[str]) -> WorldSpec:
    """``spec`` with ``FIELD=VALUE`` pairs set (a JSON value; ``student.hidden=32`` sets a
    model's field), so a candidate spec is built and checked before it becomes the default."""
    fields = asdict(spec)
    for pair in pairs:
        key, _, value = pair.partition("=")
        head, _, sub = key.partition(".")
        if not value or head not in fields or (sub and sub not in fields[head]):
            raise SystemExit(f"error: --set {pair}: want FIELD=VALUE, FIELD one of the spec's")
        new = json.loads(value)
        spec = replace(spec, **{head: replace(getattr(spec, head), **{sub: new}) if sub else new})
    return spec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="views", choices=list(WORLDS))
    ap.add_argument("--out", type=Path, default=Path("npd-out"))
    ap.add_argument("--build", action="store_true", help="build the world, logging its curves")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--report", type=Path, help="also write the report to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the build")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="a candidate spec's fields"
    )
    ap.add_argument(
        "--temperature",
        type=float,
        help="smol: sample θ₀ at this candidate temperature, not at the world's runs' one",
    )
    a = ap.parse_args(argv)
    spec = with_fields(world_spec(a.world), a.set)
    cache = a.out / "toy"
    is_smol = isinstance(spec, smol.SmolSpec)
    if a.temperature is not None and not is_smol:
        raise SystemExit("error: --temperature: only the smol world's gates take one; drop it")
    digest = spec.digest(smol.gguf_path()) if is_smol else spec.digest()  # type: ignore[call-arg]
    curve_file = cache / f"{spec.prefix}-{digest}.curves.jsonl"
    err = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.build:
        torch.set_num_threads(a.threads)
        Store(a.out)  # an npd output directory, as `npd demo` and `npd bench` make it
        cache.mkdir(parents=True, exist_ok=True)
        if is_smol:
            watch = watch_smol(spec, curve_file, time.time())
        else:
            examples = spec.examples(spec.n_train)
            train = [Prompt(e["id"], e["prompt"], e["answer"]) for e in examples]
            watch = watch_curves(spec, curve_file, train, time.time())
        world = build_toy_world(cache, spec, log=err, watch=watch)
        copy_reused_curves(world, curve_file)
        err(
            json.dumps(
                {
                    "world": str(world.root),
                    **{k: world.meta[k] for k in ("teacher", "student", "build_s")},
                }
            )
        )
        return
    world = build_toy_world(cache, spec, log=err)
    if is_smol:
        report = run_smol_gates(world, spec, curve_file, err, a.temperature)  # type: ignore[arg-type]
    else:
        report = run_gates(world, spec, curve_file, log=err)
    text = json.dumps(report, indent=1)
    if a.report:
        a.report.write_text(text + "\n")
    print(text if a.json else json.dumps(report["passed"]))


if __name__ == "__main__":
    main()
