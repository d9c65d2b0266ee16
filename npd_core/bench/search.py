"""The bench's hyperparameter search: one grid of learning rate × batch size, searched the same
way for each method.

The grid's base point is the config's own values; on-policy methods count their batch in prompts
per step, the base value being the sequences that fit the packed rows' token capacity
(``rows × max_seq_len`` over prompt + the response θ_0 actually writes). Each grid point gets a
short run (seed 0, ``SEARCH_FRACTION`` of the budget); the best final score wins, ties to the
earlier point (the base first). Where the winner sits at the edge of an axis that has several
values, that axis extends one step past it, until the choice is interior. A variant none of whose
points ends above its start still runs its seeds at its best point (``stats.learns`` marks it).

Noise rule: a search is *separated* when its winner beats the runner-up by more than one
standard error of the difference of two held-out scores (:func:`separated`); the report says so
per method, so a choice made among noise is visible. ``npd bench --quick`` runs no search: each
method takes the choice the world's last full bench recorded (:func:`recorded_choice`), or the
config's own values, marked untuned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from npd_core.bench.harness import Hyper
from npd_core.bench.stats import score_se
from npd_core.config import NPDConfig

Grid = dict[str, tuple[float, ...]]  # "lr", "batch" → multipliers of the base point
GRID: Grid = {"lr": (1.0, 0.5, 2.0), "batch": (1.0, 0.5)}
QUICK_GRID: Grid = {"lr": (1.0,), "batch": (1.0,)}
SEARCH_FRACTION = 0.5  # each grid point's search run (docs/bench-toy.json: 0.25, before the change)
EXTEND = 2.0  # a grid edge extends by this factor of its multiplier…
MAX_EXTENSIONS = 2  # …at most this many times per axis
LENGTH_SAMPLE = 256  # θ_0's answers to this many prompts size the on-policy batch
DOCS = Path(__file__).resolve().parents[2] / "docs"  # docs/bench-<world>.json: the last full bench

Point = tuple[float, float]  # (lr multiplier, batch multiplier)
# (method, hyperparameters, index of the method's search run) → the run's final score
Score = Callable[[str, Hyper, int], float]


def base_hyper(cfg: NPDConfig, prompt_tokens: float, response_tokens: float) -> Hyper:
    """The config's own values; on-policy prompts fill the packed rows' token capacity, at the
    mean prompt and response lengths (``response_tokens``: what θ_0 writes, not the cap)."""
    per_row = cfg.pack.max_seq_len / (prompt_tokens + response_tokens)
    rows = cfg.train.rows_per_step
    return Hyper(cfg.train.lr, rows, max(1, round(rows * per_row)))


def base_lengths(paths: dict[str, str], cfg: NPDConfig) -> dict[str, float]:
    """Mean prompt tokens of the training prompts and mean response tokens θ_0 writes
    (``response_tokens``): what sizes the on-policy batch."""
    from npd_core.data import read_prompts
    from npd_core.models import format_prompts, load_tokenizer

    tok = load_tokenizer(paths["student"])
    train = read_prompts(paths["train_prompts"])
    ids = format_prompts(tok, [p.prompt for p in train], cfg.data.chat_template)
    return {
        "prompt_tokens": float(np.mean([len(x) for x in ids])),
        "response_tokens": response_tokens(paths, ids, cfg),
    }


def response_tokens(paths: dict[str, str], prompts: list[list[int]], cfg: NPDConfig) -> float:
    """Mean length (EOS included) of θ_0's answers to the first ``LENGTH_SAMPLE`` training
    prompts, sampled with the run's settings: the on-policy batch is sized from it."""
    from npd_core.method.generate import generate
    from npd_core.models import load_model, load_tokenizer, use_bf16
    from npd_core.seeds import seed_for

    tok = load_tokenizer(paths["student"])
    sample = prompts[:LENGTH_SAMPLE]
    g = cfg.generate
    gens = generate(
        load_model(paths["student"]),
        sample,
        n_per_prompt=1,
        max_new_tokens=g.max_new_tokens,
        eos_ids={tok.eos_token_id},
        pad_id=tok.pad_token_id,
        temperature=g.temperature,
        top_p=g.top_p,
        seeds=[[seed_for(cfg.seed, "bench-lengths", None, i)] for i in range(len(sample))],
        batch_size=g.batch_size,
        bf16=use_bf16(cfg.models.bf16),
    )
    return float(np.mean([len(x[0].token_ids) for x in gens]))


def grid_points(base: Hyper, grid: Grid) -> list[Hyper]:
    """Every (lr, batch) multiplier pair, the base point first."""
    return [scaled(base, a, b) for b in grid["batch"] for a in grid["lr"]]


def scaled(base: Hyper, lr_mult: float, batch_mult: float) -> Hyper:
    """``base`` with its lr and both batch sizes multiplied (batches rounded, at least 1)."""
    return Hyper(
        base.lr * lr_mult,
        max(1, round(base.rows_per_step * batch_mult)),
        max(1, round(base.prompts_per_step * batch_mult)),
    )


def recorded_choice(world: str, docs: Path = DOCS) -> tuple[dict[str, Hyper], str] | None:
    """The hyperparameters the last full bench of ``world`` chose (``grid.chosen`` of
    ``docs/bench-<world>.json``) and that file's name; None when there is none (or it was a
    ``--quick`` bench, which chose nothing)."""
    path = docs / f"bench-{world}.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    if report.get("quick") or not report.get("grid", {}).get("chosen"):
        return None
    return {m: Hyper(**h) for m, h in report["grid"]["chosen"].items()}, f"docs/{path.name}"


def separated(rows: list[dict[str, Any]], n: int) -> bool | None:
    """Whether a method's search winner beats its runner-up by more than one ``score_se`` on
    ``n`` held-out prompts; None with fewer than two points (no search)."""
    if len(rows) < 2:
        return None
    best, second = sorted((r["score"] for r in rows), reverse=True)[:2]
    return best - second > score_se(best, second, n)


def search_report(
    grid: Grid,
    base: Hyper,
    lengths: dict[str, float],
    budget_s: float,
    chosen: dict[str, Hyper],
    rows: dict[str, list[dict[str, Any]]],
    held_out: int,
    tuned: Mapping[str, str],
) -> dict[str, Any]:
    """The bench JSON's ``grid``: how the hyperparameters were searched, what won, whether the
    winner stands out of the noise (``separated``) and where each method's values came from
    (``tuned``: search, a recorded bench's file, or untuned)."""
    points = grid_points(base, grid)
    return {
        "multipliers": {k: list(v) for k, v in grid.items()},
        "points": [asdict(h) for h in points],
        "base": asdict(base),
        "base_lengths": lengths,
        "extend": {"factor": EXTEND, "max_per_axis": MAX_EXTENSIONS},
        "search_budget_s": budget_s * SEARCH_FRACTION if len(points) > 1 else None,
        "chosen": {m: asdict(h) for m, h in chosen.items()},
        "scores": rows,
        "separated": {m: separated(r, held_out) for m, r in rows.items()},
        "tuned": dict(tuned),
    }


def search(
    methods: Iterable[str],
    score: Score,
    base: Hyper,
    grid: Grid,
    log: Callable[[str], None],
    recorded: Mapping[str, Hyper] | None = None,
) -> tuple[dict[str, Hyper], dict[str, list[dict[str, Any]]]]:
    """Per method, ``score`` at every grid point; the best wins (ties: the earlier point). Where
    the winner sits at the edge of an axis that has several values, that axis extends one step
    past it (× or ÷ ``EXTEND`` of the edge multiplier, the other axis at the winner's value), at
    most ``MAX_EXTENSIONS`` times per axis, until the choice is interior. A method in
    ``recorded`` takes that choice unsearched. Returns the choice and every search run's row,
    by method."""
    chosen: dict[str, Hyper] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        if recorded and method in recorded:
            chosen[method], rows[method] = recorded[method], []
        else:
            chosen[method], rows[method] = _search_one(method, score, base, grid, log)
    return chosen, rows


def tuning(
    methods: Iterable[str], grid: Grid, recorded: tuple[dict[str, Hyper], str] | None
) -> dict[str, str]:
    """Where each method's hyperparameters come from: ``search`` (a grid of several points),
    the recorded bench's file, or ``untuned`` (the config's own values)."""
    searched = len(grid["lr"]) * len(grid["batch"]) > 1
    return {
        m: "search" if searched else recorded[1] if recorded and m in recorded[0] else "untuned"
        for m in methods
    }


def _search_one(
    method: str, score: Score, base: Hyper, grid: Grid, log: Callable[[str], None]
) -> tuple[Hyper, list[dict[str, Any]]]:
    points = [(a, b) for b in grid["batch"] for a in grid["lr"]]
    if len(points) == 1:
        return scaled(base, *points[0]), []
    tried: dict[Point, float] = {}  # (lr mult, batch mult) → score, in run order
    rows: list[dict[str, Any]] = []

    def run(point: Point, extension: bool) -> None:
        h = scaled(base, *point)
        s = score(method, h, len(tried))
        tried[point] = s
        rows.append({**asdict(h), "score": s, "extension": extension})
        log(f"search {method} lr={h.lr:.3g} batch={h.batch(method)}: {s:.2f}")

    for p in points:
        run(p, extension=False)
    extensions = {0: 0, 1: 0}  # axis (0 lr, 1 batch) → extensions so far
    while True:
        order = list(tried)
        best = max(order, key=lambda k: (tried[k], -order.index(k)))
        nxt = _extension(best, grid, tried, extensions, base)
        if nxt is None:
            return scaled(base, *best), rows
        extensions[nxt[0]] += 1
        run(nxt[1], extension=True)


def _extension(
    best: Point, grid: Grid, tried: dict[Point, float], extensions: dict[int, int], base: Hyper
) -> tuple[int, Point] | None:
    """The next point past the edge ``best`` sits on, if an axis allows one more extension."""
    for axis, name in ((0, "lr"), (1, "batch")):
        if len(grid[name]) < 2 or extensions[axis] >= MAX_EXTENSIONS:
            continue
        values = sorted({k[axis] for k in tried})
        if best[axis] not in (values[0], values[-1]):
            continue
        m = best[axis] / EXTEND if best[axis] == values[0] else best[axis] * EXTEND
        point = (m, best[1]) if axis == 0 else (best[0], m)
        if point in tried or (axis == 1 and scaled(base, *point) == scaled(base, *best)):
            continue  # rounding gives the same batch: nothing left on this side
        return axis, point
    return None
