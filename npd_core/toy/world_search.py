"""The search that chose the long world's sizes (``LongSpec``): train one model of a candidate
on true answers and log its held-out curve, so a teacher's reach and a student's plateau are
read off the same kind of run the world's build makes. Not part of the pipeline.

    python -m npd_core.toy.world_search --tag t-h128l3 --hidden 128 --layers 3 --steps 1500 \\
        --out npd-out/world-search

writes ``<out>/<tag>/curve.jsonl`` (one line per evaluation: step, seconds, final-line and
whole-trace exact match, by list length) and the model as an HF checkpoint. With ``--build``
the candidate is a whole world instead (``build_toy_world`` of a ``LongSpec`` with these sizes,
cached under ``<out>/cache``), its teacher's and student's curves logged as they train.

    python -m npd_core.toy.world_search --share TEACHER_DIR STUDENT_DIR --batch 48 96

times synchronous on-policy steps (``onpolicy_step_times``: the loop body of
``npd_core.baselines.onpolicy``) and prints each phase's share of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from npd_core.baselines.onpolicy import teacher_topk
from npd_core.config import TrainConfig
from npd_core.data import Prompt
from npd_core.method.answers import final_line, normalize
from npd_core.method.attention import packed_attention
from npd_core.method.evaluate import greedy_responses
from npd_core.method.generate import generate
from npd_core.method.optim import make_optimizer
from npd_core.method.packing import Sample, collate
from npd_core.method.train import optimizer_step, train_round
from npd_core.models import load_model, load_tokenizer, n_params, save_checkpoint
from npd_core.toy import long_task
from npd_core.toy.world import LongSpec, ModelSpec, _model, build_toy_world, fit_plan


def held_out_scores(model, tok, prompts: list[Prompt], max_new_tokens: int) -> dict:
    """Final-line and whole-trace exact match in points, overall and by list length."""
    ids = [tok(p.prompt)["input_ids"] for p in prompts]
    resp = greedy_responses(
        model, tok, ids, max_new_tokens=max_new_tokens, batch_size=256, bf16=False
    )
    texts = [tok.decode(r, skip_special_tokens=True) for r in resp]
    by_n: dict[int, list[bool]] = {}
    fl, whole = [], []
    for p, t in zip(prompts, texts, strict=True):
        ok = final_line(t) == final_line(p.answer)
        fl.append(ok)
        whole.append(normalize(t) == normalize(p.answer))
        by_n.setdefault(len(long_task.prompt_words(p.prompt)), []).append(ok)
    return {
        "final_line": 100.0 * sum(fl) / len(fl),
        "whole": 100.0 * sum(whole) / len(whole),
        "mean_resp_tokens": sum(len(r) + 1 for r in resp) / len(resp),
        "by_n": {n: round(100.0 * sum(v) / len(v), 1) for n, v in sorted(by_n.items())},
    }


def onpolicy_step_times(
    teacher_dir: str,
    student_dir: str,
    prompts: list[Prompt],
    batch: int,
    steps: int = 4,
    max_new_tokens: int | None = None,
    threads: int = 2,
) -> dict:
    """Seconds per phase of ``steps`` synchronous on-policy steps at ``batch`` prompts (after
    one untimed warm-up step), as ``onpolicy_segment`` takes them: the current student samples
    (temperature 1), the teacher's top-k forward, one padded forward-KL step."""
    torch.set_num_threads(threads)
    tok = load_tokenizer(student_dir)
    student, teacher = load_model(student_dir), load_model(teacher_dir)
    cfg = TrainConfig(rows_per_step=batch)
    opt = make_optimizer(student, cfg)
    ids = [tok(p.prompt)["input_ids"] for p in prompts]
    cap = max_new_tokens or LongSpec().max_new_tokens
    phases: dict[str, list[float]] = {"generate": [], "teacher": [], "train": []}
    cpu: dict[str, list[float]] = {k: [] for k in phases}  # process CPU seconds: load-proof
    resp_tokens: list[float] = []
    for step in range(steps + 1):
        chunk = [ids[(step * batch + i) % len(ids)] for i in range(batch)]
        c0 = time.process_time()
        t0 = time.perf_counter()
        gens = generate(
            student,
            chunk,
            n_per_prompt=1,
            max_new_tokens=cap,
            eos_ids={tok.eos_token_id},
            pad_id=tok.pad_token_id,
            temperature=1.0,
            top_p=1.0,
            seeds=[[1000 * step + i] for i in range(batch)],
            batch_size=batch,
            bf16=False,
        )
        samples = [Sample(p, g[0].token_ids) for p, g in zip(chunk, gens, strict=True)]
        t1, c1 = time.perf_counter(), time.process_time()
        offsets = np.cumsum([0] + [len(x.response_ids) for x in samples])[:-1].tolist()
        rows = [[i] for i in range(len(samples))]
        b = collate(samples, rows, tok.pad_token_id, target_offsets=offsets)
        targets = teacher_topk(teacher, b, offsets, 16, False)
        t2, c2 = time.perf_counter(), time.process_time()
        student.train()
        optimizer_step(student, opt, b, targets, cfg, lr=1e-4, step=step, bf16=False)
        t3, c3 = time.perf_counter(), time.process_time()
        if step:
            walls, cpus = (t1 - t0, t2 - t1, t3 - t2), (c1 - c0, c2 - c1, c3 - c2)
            for k, v, c in zip(phases, walls, cpus, strict=True):
                phases[k].append(v)
                cpu[k].append(c)
            resp_tokens.append(float(np.mean([len(x.response_ids) for x in samples])))
    med = {k: statistics.median(v) for k, v in phases.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    total, total_cpu = sum(med.values()), sum(med_cpu.values())
    return {
        "batch": batch,
        "threads": threads,
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "share": {k: round(v / total, 3) for k, v in med.items()},
        "cpu_seconds": {k: round(v, 4) for k, v in med_cpu.items()},
        "cpu_share": {k: round(v / total_cpu, 3) for k, v in med_cpu.items()},
        "mean_response_tokens": round(statistics.mean(resp_tokens), 1),
        "params": {"teacher": n_params(teacher), "student": n_params(student)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default="npd-out/world-search")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--inter", type=int, default=0, help="MLP width; 0 = 3 × hidden")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=12)
    ap.add_argument("--n-fit", type=int, default=30000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build", action="store_true", help="build the whole world")
    ap.add_argument(
        "--student",
        type=int,
        nargs=4,
        default=[64, 1, 128, 60],
        metavar=("HIDDEN", "LAYERS", "INTER", "STEPS"),
        help="--build: student",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the machine is shared)"
    )
    ap.add_argument("--share", nargs=2, metavar=("TEACHER", "STUDENT"))
    ap.add_argument("--batch", type=int, nargs="+", default=[48, 96])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.share:
        spec = replace(LongSpec(), min_len=a.min_len, max_len=a.max_len, seed=a.seed)
        ex = spec.examples(spec.n_train)
        ps = [Prompt(e["id"], e["prompt"], e["answer"]) for e in ex]
        for b in a.batch:
            res = onpolicy_step_times(
                *a.share, ps, b, max_new_tokens=spec.max_new_tokens, threads=a.threads
            )
            line = json.dumps({"tag": a.tag, **res})
            print(line, flush=True)
            with (Path(a.out) / "share.jsonl").open("a") as f:
                f.write(line + "\n")
        return
    if a.build:
        build(a)
        return
    ms = ModelSpec(a.hidden, a.layers, a.hidden // 64, a.inter or 3 * a.hidden, a.steps, a.lr)
    spec = replace(
        LongSpec(),
        n_fit=a.n_fit,
        min_len=a.min_len,
        max_len=a.max_len,
        rows_per_step=a.rows,
        seed=a.seed,
    )
    out = Path(a.out) / a.tag
    out.mkdir(parents=True, exist_ok=True)
    tok = long_task.build_tokenizer()
    ex = spec.examples(spec.n_train + spec.n_eval + spec.n_fit)
    prompts = [Prompt(e["id"], e["prompt"], e["answer"]) for e in ex]
    held = prompts[spec.n_train : spec.n_train + a.n_eval]
    fit_set = prompts[spec.n_train + spec.n_eval :] + prompts[: spec.n_train]
    torch.manual_seed(a.seed)
    model = _model(ms, tok)
    step, pack, samples, rows = fit_plan(tok, fit_set, ms, spec)
    meta = {"model": asdict(ms), "params": n_params(model), "spec": asdict(spec), "args": vars(a)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"{a.tag}: {meta['params'] / 1e6:.3f} M params, {len(rows)} rows", flush=True)
    t0 = time.time()
    log = (out / "curve.jsonl").open("a")

    def evaluate(step: int) -> None:
        was = model.training
        res = held_out_scores(model, tok, held, spec.max_new_tokens)
        model.train(was)
        row = {"step": step, "train_s": round(time.time() - t0, 1), **res}
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    def on_step(entry) -> None:
        if (entry.step + 1) % a.eval_every == 0 and entry.step + 1 < ms.train_steps:
            evaluate(entry.step + 1)

    opt = make_optimizer(model, step)
    # stock SDPA under the mask transformers builds from the packed position ids (the
    # ``sdpa`` kernel): exact like the build's, and it also generates for the evaluations
    train_round(
        model,
        opt,
        samples,
        None,
        rows,
        step,
        pack.max_seq_len,
        start_step=0,
        total_steps=ms.train_steps,
        seed=spec.seed,
        pad_id=tok.pad_token_id,
        bf16=False,
        on_step=on_step,
    )
    evaluate(ms.train_steps)
    save_checkpoint(model, tok, out / "model")


def build(a: argparse.Namespace) -> None:
    """One candidate as a whole world: ``build_toy_world`` with curves."""
    teacher = ModelSpec(a.hidden, a.layers, a.hidden // 64, a.inter or 3 * a.hidden, a.steps, a.lr)
    h, n_layers, inter, steps = a.student
    spec = replace(
        LongSpec(),
        teacher=teacher,
        student=ModelSpec(h, n_layers, h // 64, inter, steps, 3e-3),
        min_len=a.min_len,
        max_len=a.max_len,
        rows_per_step=a.rows,
        seed=a.seed,
    )
    out = Path(a.out) / a.tag
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps({"digest": spec.digest(), **asdict(spec)}, indent=2))
    tok = long_task.build_tokenizer()
    t0 = time.time()
    model_steps = {"teacher": spec.teacher.train_steps, "student": spec.student.train_steps}

    def watch(name: str, model, held: list[Prompt]):
        def on_step(entry) -> None:
            if (entry.step + 1) % a.eval_every or entry.step + 1 >= model_steps[name]:
                return
            was = model.training
            with packed_attention(model, "sdpa"):
                res = held_out_scores(model, tok, held[: a.n_eval], spec.max_new_tokens)
            model.train(was)
            row = {"model": name, "step": entry.step + 1, "s": round(time.time() - t0), **res}
            with (out / "curve.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

        return on_step

    world = build_toy_world(
        Path(a.out) / "cache", spec, log=lambda m: print(m, flush=True), watch=watch
    )
    keep = ("teacher", "student", "build_s")
    print(json.dumps({"world": str(world.root), **{k: world.meta[k] for k in keep}}), flush=True)


if __name__ == "__main__":
    main()
