"""Which loss lifts a views student, on which states: from one student checkpoint, a few steps
of each arm with the pipeline's own loss, optimizer step and teacher top-k targets, the greedy
per-line score measured as it goes.

Arms: ``okl`` forward KL on the student's own samples (``okl-t0.5``: sampled at T = 0.5),
``rkl`` reverse KL on them, ``oce`` CE on the teacher's argmax at their positions (the
teacher's greedy choice at the student's own states), ``kd`` forward KL on the true answers,
``ce`` CE on the teacher's argmax of the true answers, ``opre`` forward KL on the student's own
samples cut after their first wrong token (only states on the true path, and the one where the
student left it), ``oline`` forward KL on the student's own samples with each line's positions
after its first wrong token left out (later lines kept), ``orec`` CE on the teacher's argmax at
the student's own states except inside a wrong line, where the target is the true line's token
at the same place in the line (a recovery rule: write the view's next word by position), and
``oreckl`` the same with forward KL on the teacher's top-k outside wrong lines. Prints one
JSON line per arm::

    python scripts/views_loss_probe.py WORLD_DIR STUDENT_DIR --arms okl,okl-t0.5,rkl,kd,ce
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace

import torch

from npd_core.baselines.onpolicy import teacher_topk
from npd_core.config import NPDConfig
from npd_core.data import read_prompts
from npd_core.method.generate import generate
from npd_core.method.optim import make_optimizer
from npd_core.method.packing import IGNORE_INDEX, Sample, collate, response_offsets
from npd_core.method.train import micro_batches, optimizer_step
from npd_core.models import format_prompts, load_model, load_tokenizer
from npd_core.seeds import seed_for
from npd_core.toy.gates import grade, greedy_texts
from npd_core.toy.world import ViewsSpec

LOSS = {
    "okl": "forward_kl",
    "rkl": "reverse_kl",
    "oce": "ce",
    "kd": "forward_kl",
    "ce": "ce",
    "opre": "forward_kl",
    "oline": "forward_kl",
    "orec": "ce",
    "oreckl": "forward_kl",
}
# the arms that train on the student's own samples, and those that read the true answer by line
OWN = ("okl", "rkl", "oce", "opre", "oline", "orec", "oreckl")
MASKED = ("oline", "orec", "oreckl")


def on_path(resp: list[int], truth: list[int]) -> list[int]:
    """``resp`` up to and including its first token that differs from ``truth``."""
    for t, (a, b) in enumerate(zip(resp, truth, strict=False)):
        if a != b:
            return resp[: t + 1]
    return resp


def split_lines(ids: list[int], newline: int) -> list[list[int]]:
    """Token ids as lines, each ending in its newline (the last line in whatever ends it)."""
    out: list[list[int]] = [[]]
    for t in ids:
        out[-1].append(t)
        if t == newline:
            out.append([])
    return out


def line_prefix_right(resp: list[int], truth: list[int], newline: int) -> list[bool]:
    """Per response token: is everything before it in its own line equal to the true line?"""
    keep: list[bool] = []
    true_lines = split_lines(truth, newline)
    for j, line in enumerate(split_lines(resp, newline)):
        ref = true_lines[j] if j < len(true_lines) else []
        right = True
        for m, t in enumerate(line):
            keep.append(right)
            right = right and m < len(ref) and ref[m] == t
    return keep


def recovery(resp: list[int], truth: list[int], newline: int) -> list[int]:
    """Per response token: the true line's token at its place in its own line (the line's
    last token, its newline or EOS, past its end; EOS past the last line)."""
    true_lines, out = split_lines(truth, newline), []
    for j, line in enumerate(split_lines(resp, newline)):
        ref = true_lines[j] if j < len(true_lines) and true_lines[j] else [truth[-1]]
        out.extend(ref[min(m, len(ref) - 1)] for m in range(len(line)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", help="a built views world (its teacher and prompt files)")
    ap.add_argument("student", help="the student checkpoint every arm starts from")
    ap.add_argument("--arms", default="okl,rkl,kd,ce")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--prompts", type=int, default=60, help="prompts a step")
    ap.add_argument("--held-out", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = NPDConfig.model_validate(ViewsSpec().config_defaults())
    tok = load_tokenizer(f"{a.world}/teacher")
    teacher = load_model(f"{a.world}/teacher").eval()
    train = read_prompts(f"{a.world}/train.jsonl")
    held = read_prompts(f"{a.world}/eval.jsonl")[: a.held_out]
    train_ids = format_prompts(tok, [p.prompt for p in train], cfg.data.chat_template)
    held_ids = format_prompts(tok, [p.prompt for p in held], cfg.data.chat_template)
    cap = cfg.generate.max_new_tokens
    true = [tok(p.answer)["input_ids"] + [tok.eos_token_id] for p in train]

    def lines_of(texts: list[str], answers: list[str]) -> float:
        return round(grade(texts, answers).lines, 1)

    def score(model) -> float:
        model.eval()
        return lines_of(greedy_texts(model, tok, held_ids, cap), [p.answer for p in held])

    for arm in a.arms.split(","):
        kind, _, temp = arm.partition("-t")
        spec = replace(cfg.train.step_spec(), loss=LOSS[kind])
        model = load_model(a.student)
        opt = make_optimizer(model, spec)
        curve, losses, sample_lines = [score(model)], [], None
        rng = random.Random(0)
        for step in range(a.steps):
            idx = rng.sample(range(len(train)), a.prompts)
            if kind in OWN:
                model.eval()
                gens = generate(
                    model, [train_ids[i] for i in idx], n_per_prompt=1, max_new_tokens=cap,
                    eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                    temperature=float(temp or 1.0), top_p=1.0,
                    seeds=[[seed_for(step, "probe", None, i)] for i in idx],
                    batch_size=256, bf16=False,
                )  # fmt: skip
                resp = [g[0].token_ids for g in gens]
                if kind == "opre":
                    resp = [on_path(r, true[i]) for r, i in zip(resp, idx, strict=True)]
                if step == 0:
                    texts = [tok.decode(r, skip_special_tokens=True) for r in resp]
                    sample_lines = lines_of(texts, [train[i].answer for i in idx])
            else:
                resp = [true[i] for i in idx]
            samples = [Sample(train_ids[i], r) for i, r in zip(idx, resp, strict=True) if r]
            offsets = response_offsets(samples)
            rows = [[i] for i in range(len(samples))]
            if kind in MASKED:
                newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
                keep = torch.tensor(
                    [
                        k
                        for s, i in zip(samples, idx, strict=True)
                        for k in line_prefix_right(s.response_ids, true[i], newline)
                    ]
                )
            batch = collate(samples, rows, tok.pad_token_id, target_offsets=offsets)
            with torch.no_grad():
                targets = teacher_topk(teacher, batch, offsets, cfg.score.top_k, False)
            if kind in ("orec", "oreckl"):  # the recovery token where the line went wrong
                rec = torch.tensor(
                    [
                        t
                        for s, i in zip(samples, idx, strict=True)
                        for t in recovery(s.response_ids, true[i], newline)
                    ]
                )
                wrong = ~keep
                targets.topk_ids[wrong, 0] = rec[wrong]
                targets.topk_logprobs[wrong, 0] = 0.0
                targets.topk_logprobs[wrong, 1:] = -30.0
            model.train()
            micro = micro_batches(
                samples, rows, tok.pad_token_id, spec.forwards(len(rows)), target_offsets=offsets
            )
            if kind == "oline":
                for b in micro:
                    at = b.target_index >= 0
                    b.labels[at & ~keep[b.target_index.clamp(min=0)]] = IGNORE_INDEX
            loss = optimizer_step(model, opt, micro, targets, spec, lr=a.lr, step=step, bf16=False)
            if (step + 1) % max(1, a.steps // 4) == 0:
                curve.append(score(model))
                losses.append(round(loss.item(), 4))
        row = {"arm": arm, "lr": a.lr, "steps": a.steps, "sample_lines": sample_lines}
        print(json.dumps(row | {"curve": curve, "loss": losses}), flush=True)


if __name__ == "__main__":
    main()
