"""Planted junk: how well each filter score finds samples known to be bad, without training.

For each checkpoint θ_k of a run (the generator of a round) and θ_{k+1} (its learner), fresh
samples of the run's prompts are drawn from θ_k, and a known ``JUNK_SHARE`` of them is replaced
by junk of two kinds in equal parts:

- ``stale``: the same prompt's sample from θ₀ (what a far too stale generator writes), with θ₀'s
  own sampling log-probs as its generator's;
- ``loop``: a sample's first line repeated up to the length cap (no EOS), its generator log-probs
  those θ_k gives the looped tokens.

(``generate.plant_junk`` plants the same two kinds inside a training run:
:mod:`npd_core.pipeline.plant`.)

Each score of ``filter.score`` is then computed as the pipeline does (Δ-IFD's student side is
θ_k for every row; ``conditional`` and ``learner_ratio`` read each row's own generator) and
rated by its AUROC for finding the junk, the bad tail ranking first (``learner_ratio``: its
absolute value; a NaN score counts as flagged, as the filter drops it). The unfinished flag is
rated beside them. Per round, all junk against the clean samples and each kind alone; over the
rounds, the mean with a bootstrap 95% interval (rounds resampled).

``npd bench filter --stage junk --run RUN_ID --out DIR [--rounds 1,2,3,4,5] [--n 1024]``
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from npd_core.bench.plots import junk_auroc
from npd_core.data import read_prompts, round_prompts
from npd_core.method.filter import learner_ratio
from npd_core.method.generate import Generation, generate
from npd_core.method.ifd import conditional, delta_ifd, log_ifd, ratio_ifd, teacher_nll
from npd_core.method.score import score
from npd_core.models import format_prompts, load_model, load_tokenizer, use_bf16, view_prefix
from npd_core.pipeline.plant import loop_of
from npd_core.pipeline.spec import RunSpec
from npd_core.seeds import seed_for

JUNK_SHARE = 0.15
ROUND_BASE = 2_000_000  # prompt draws of this bench never coincide with a run's rounds
SCORES = ("delta_ifd", "delta_ifd_ratio", "conditional", "teacher_nll", "learner_ratio")
FLAGS = (*SCORES, "unfinished")
KINDS = ("all", "stale", "loop")
BOOTSTRAP = 10_000


def auroc(score: np.ndarray, junk: np.ndarray) -> float:
    """P(a junk row scores above a clean one), ties half (the Mann-Whitney U statistic over
    its maximum); NaN scores rank highest. (N,), (N,) bool → float."""
    s = np.where(np.isnan(score), np.inf, np.asarray(score, dtype=np.float64))
    pos = np.asarray(junk, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_mean_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float] | None:
    """Percentile 95% interval of the mean, the values resampled with replacement."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None
    picks = np.random.default_rng(seed).integers(0, len(v), (BOOTSTRAP, len(v)))
    lo, hi = np.percentile(v[picks].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def junk_scores(
    teacher: Any, generator: Any, learner: Any, prompts: list[list[int]], rows: list[Generation],
    view: list[int], batch_tokens: int, bf16: bool,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every score of ``filter.score`` (both IFD forms) and the unfinished flag, oriented so
    that high is bad. ``rows[i].logprobs`` are row i's generator's. (N,) each."""
    resps = [g.token_ids for g in rows]
    n = np.array([len(r) for r in resps], dtype=np.float64)
    kw = dict(top_k=None, batch_tokens=batch_tokens, bf16=bf16)
    t = score(teacher, prompts, resps, view=view, **kw)
    s = score(generator, prompts, resps, view=view, **kw)
    lr = score(learner, prompts, resps, view=None, **kw)
    gen_lp = [np.asarray(g.logprobs, dtype=np.float32) for g in rows]
    seq = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in resps]))
    ratio = learner_ratio(
        torch.from_numpy(np.concatenate(lr.token_logprobs)),
        torch.from_numpy(np.concatenate(gen_lp)),
        seq,
        len(rows),
    ).numpy()
    return {
        "delta_ifd": delta_ifd(
            log_ifd(t.cond_logprob_sum, t.resp_logprob_sum, n),
            log_ifd(s.cond_logprob_sum, s.resp_logprob_sum, n),
        ),
        "delta_ifd_ratio": delta_ifd(
            ratio_ifd(t.cond_logprob_sum, t.resp_logprob_sum, n),
            ratio_ifd(s.cond_logprob_sum, s.resp_logprob_sum, n),
        ),
        "conditional": conditional(
            t.cond_logprob_sum, np.array([x.sum() for x in gen_lp], dtype=np.float64), n
        ),
        "teacher_nll": teacher_nll(t.cond_logprob_sum, n),
        "learner_ratio": np.abs(ratio.astype(np.float64)),
        "unfinished": np.array([not g.finished for g in rows], dtype=np.float64),
    }


def run_junk(
    root: str,
    run_id: str,
    rounds: Sequence[int] = (1, 2, 3, 4, 5),
    n: int = 1024,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """AUROC of each score and the unfinished flag for the planted junk, per round and over
    the rounds (generator θ_k, learner θ_{k+1}, k in ``rounds``); also written to
    ``<root>/filter-study/junk.json``, with a plot of the AUROCs beside it."""
    spec = RunSpec.load(root, run_id)
    cfg = spec.cfg
    torch.set_num_threads(cfg.stage_threads(concurrent=False))
    teacher = load_model(spec.teacher)
    tok = load_tokenizer(spec.teacher)
    view = view_prefix(tok, cfg.filter.view, cfg.filter.view_text, cfg.data.chat_template)
    nl = tok.convert_tokens_to_ids("\n") if "\n" in tok.get_vocab() else None
    theta0 = load_model(spec.checkpoint(0))
    g, bf16 = cfg.generate, use_bf16(cfg.models.bf16)

    def sample(model: Any, ids: list[list[int]], seeds: list[list[int]]) -> list[Generation]:
        return [row[0] for row in generate(
            model, ids, n_per_prompt=1, max_new_tokens=g.max_new_tokens,
            eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id or 0,
            temperature=g.temperature, top_p=g.top_p, seeds=seeds,
            batch_size=g.batch_size, bf16=bf16,
        )]  # fmt: skip

    out: dict[str, Any] = {
        "run_id": run_id,
        "n": n,
        "junk_share": JUNK_SHARE,
        "rounds": {},
    }
    for k in rounds:
        prompts = round_prompts(read_prompts(spec.train_prompts), n, cfg.seed, ROUND_BASE + k)
        ids = format_prompts(tok, [p.prompt for p in prompts], cfg.data.chat_template)
        seeds = [[seed_for(cfg.seed, "junk", k, p.id, 0)] for p in prompts]
        generator, learner = load_model(spec.checkpoint(k)), load_model(spec.checkpoint(k + 1))
        log(f"θ_{k}: sampling {n} responses, planting {JUNK_SHARE:.0%} junk")
        rows = sample(generator, ids, seeds)
        rng = np.random.default_rng(seed_for(cfg.seed, "junk-plant", k))
        planted = rng.choice(n, round(JUNK_SHARE * n), replace=False)
        stale, loops = planted[: len(planted) // 2], planted[len(planted) // 2 :]
        old = sample(theta0, [ids[i] for i in stale], [seeds[i] for i in stale])
        for i, x in zip(stale, old, strict=True):
            rows[i] = x
        looped = [loop_of(rows[i].token_ids, nl, tok.eos_token_id, g.max_new_tokens) for i in loops]
        lp = score(
            generator, [ids[i] for i in loops], looped, view=None, top_k=None,
            batch_tokens=cfg.score.batch_tokens, bf16=bf16,
        ).token_logprobs  # fmt: skip
        for i, y, x in zip(loops, looped, lp, strict=True):
            rows[i] = Generation(y, x.tolist(), finished=False)
        scores = junk_scores(
            teacher, generator, learner, ids, rows, view, cfg.score.batch_tokens, bf16
        )
        kind = np.zeros(n, dtype=np.int8)  # 0 clean, 1 stale, 2 loop
        kind[stale], kind[loops] = 1, 2
        row: dict[str, Any] = {}
        for name, values in scores.items():
            row[name] = {
                "all": auroc(values, kind > 0),
                "stale": auroc(values[kind != 2], kind[kind != 2] == 1),
                "loop": auroc(values[kind != 1], kind[kind != 1] == 2),
            }
        out["rounds"][str(k)] = row
        log(f"θ_{k} AUROC " + "  ".join(f"{s} {row[s]['all']:.3f}" for s in FLAGS))
    out["summary"] = {
        s: {
            kind: {
                "mean": float(np.mean(v := [out["rounds"][str(k)][s][kind] for k in rounds])),
                "ci95": bootstrap_mean_ci(v),
            }
            for kind in KINDS
        }
        for s in FLAGS
    }
    path = Path(root) / "filter-study" / "junk.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    title = f"planted junk ({JUNK_SHARE:.0%}) in {run_id}, rounds {', '.join(map(str, rounds))}"
    out["plot"] = str(junk_auroc(out["summary"], title, path.with_suffix(".png")))
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out
