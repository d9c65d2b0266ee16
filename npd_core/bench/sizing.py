"""NPD's rounds sized to the bench's budget, from a two-round probe run at the same batch size.

The probe (run by the bench, one per batch size and thread count) measures seconds per packed
row trained and per sample produced, each alone (round 1's producer, round 2's learner), and the
overlap gain: how much faster the overlapped middle (round 1 learning while round 2 is produced)
ran than the same two stages in order. :func:`npd_rounds` fits the most rounds in the budget at
that speed, so NPD's cosine schedule ends where its budget does.
"""

from __future__ import annotations

import math

from npd_core.bench.clock import StageTimes, npd_clock, work_seconds
from npd_core.bench.cost import pipeline_clock
from npd_core.config import NPDConfig
from npd_core.method.optim import round_steps
from npd_core.threads import stage_threads

Probe = dict[str, float]  # train_s_per_row, produce_s_per_sample, rows_per_sample, overlap_gain…


def npd_rounds(cfg: NPDConfig, cal: Probe, budget_s: float) -> int:
    """The most rounds whose predicted clock fits ``budget_s`` at the probe's speed.

    Producing a round takes P, learning it L. In order, R rounds take R·(P + L). Overlapped
    (staleness ≥ 1), the first producer and the last learner run alone and every round between
    takes M = max(P, L, (P + L) / g), g being the probe's overlap gain (the two stages share the
    cores): P + (R − 1)·M + L. Never more than the budget, since a checkpoint past it is dropped;
    the unused tail is under one round."""
    produce, learn, middle = _round_costs(cfg, cal)
    if middle is not None:
        return max(1, 1 + math.floor((budget_s - produce - learn) / middle))
    return max(1, math.floor(budget_s / (learn + produce)))


def predicted_clock(cfg: NPDConfig, cal: Probe, rounds: int) -> float:
    """The clock ``rounds`` rounds take at the probe's speed (``npd_rounds``' model)."""
    produce, learn, middle = _round_costs(cfg, cal)
    return pipeline_clock(produce, learn, rounds, None if middle is None else cal["overlap_gain"])


def _round_costs(cfg: NPDConfig, cal: Probe) -> tuple[float, float, float | None]:
    """P, L and (overlapped runs) M of ``npd_rounds``."""
    samples = cfg.data.prompts_per_round * cfg.generate.n_per_prompt
    steps = round_steps(round(cal["rows_per_sample"] * samples), cfg.train)
    learn = steps * cfg.train.rows_per_step * cal["train_s_per_row"]
    produce = samples * cal["produce_s_per_sample"]
    if cfg.staleness > 0 and cfg.overlap:
        return produce, learn, max(produce, learn, (produce + learn) / cal["overlap_gain"])
    return produce, learn, None


def thread_options(cfg: NPDConfig) -> list[int]:
    """Threads per stage the probe tries: the config's own when it sets them; else what a stage
    gets beside another (half the cores) and alone (all of them), the run's own rule."""
    return sorted({stage_threads(cfg.threads, concurrent) for concurrent in (True, False)})


def choose_threads(cfg: NPDConfig, cals: dict[str, Probe], budget_s: float) -> tuple[int, Probe]:
    """The probed thread count that fits the most rounds in the budget (ties: the shorter
    predicted clock, then fewer threads), and its probe figures."""

    def rank(t: str) -> tuple[int, float, int]:
        rounds = npd_rounds(cfg, cals[t], budget_s)
        return (-rounds, predicted_clock(cfg, cals[t], rounds), int(t))

    best = min(cals, key=rank)
    return int(best), cals[best]


def probe_figures(
    times: StageTimes, generated: int, rows: int, optimizer_steps: int, rows_per_step: int
) -> Probe:
    """A two-round probe run's figures: ``generated`` samples in round 1, packed into ``rows``
    rows, and ``optimizer_steps`` steps of ``rows_per_step`` over both rounds. Seconds are those
    the clock counts (loads and writes left out)."""
    work = work_seconds(times)
    produce = sum(work[(s, 1)] for s in ("generate", "score", "filter", "pack"))
    learn = work[("train", 2)]
    _, total = npd_clock(times)
    return {
        "train_s_per_row": learn / max(1, optimizer_steps / 2 * rows_per_step),
        "produce_s_per_sample": produce / generated,
        "rows_per_sample": rows / generated,
        "overlap_gain": min(2.0, max(1.0, (produce + learn) / max(1e-9, total - produce - learn))),
        "probe_s": total,
    }
