"""The bench's training clock: what a variant's seconds count, and NPD's curve on that clock.

The baselines stop their clock between segments (evaluation and checkpointing run while it is
stopped). NPD's rounds overlap, so its clock is rebuilt afterwards from when each stage ran: it
runs while a stage computes, not while evaluation or loading and writing (models, checkpoints,
Parquet: the stages' ``io_spans``) are all that runs, nor between stages (:func:`paused_clock`).
The same seconds are left out of every variant's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from npd_core import iotime
from npd_core.pipeline.results import RunSummary

Interval = tuple[str, int, float, float]  # (stage, round, start, end), absolute seconds
Span = tuple[float, float]


@dataclass(frozen=True)
class StageTimes:
    """When each stage of an NPD run ran, and the loads and writes inside those stages."""

    stages: Sequence[Interval]
    io: Sequence[Interval] = ()

    @classmethod
    def of(cls, run: RunSummary) -> StageTimes:
        return cls(run.stage_intervals, run.io_intervals)


@dataclass(frozen=True)
class NpdCurve:
    """An NPD run on its clock, cut where the budget ends."""

    points: list[dict[str, float]]  # θ_0, then each round in time: wall_s, score, tokens, steps
    stage_seconds: dict[str, float]  # as the clock counts them, until the curve's last round
    train_tokens: int  # trained on in the curve's rounds
    generated_tokens: int  # sampled by the rounds whose generation ended by then


def paused_clock(intervals: Sequence[tuple[float, float, bool]]) -> Callable[[float], float]:
    """A training clock from stage intervals ``(start, end, is_evaluation)`` (absolute times).

    ``clock(T)`` = time since the first stage started, minus the time before ``T`` during which
    no stage but evaluation ran: the clock pauses while evaluating alone and in the gaps between
    stages (orchestration: the baselines' clocks stop between their segments too). Evaluation
    that overlaps another stage is not subtracted (that stage's work is real time), so this
    never credits a variant with more than the paused-clock baselines get.
    """
    t0 = min(s for s, _, _ in intervals)
    edges = sorted({x for s, e, _ in intervals for x in (s, e)})
    paused = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        mid = (a + b) / 2
        if all(ev for s, e, ev in intervals if s <= mid < e):  # evaluation alone, or nothing
            paused.append((a, b))

    def clock(t: float) -> float:
        off = sum(max(0.0, min(b, t) - a) for a, b in paused)
        return t - t0 - off

    return clock


def npd_clock(times: StageTimes) -> tuple[Callable[[float], float], float]:
    """An NPD run's training clock and its reading when the last non-evaluation stage ended."""
    io = io_spans(times)
    pieces: list[tuple[float, float, bool]] = []
    for stage, r, s, e in times.stages:
        if stage == "evaluate":
            pieces.append((s, e, True))
            continue
        spans = io.get((stage, r), [])
        pieces += [(a, b, True) for a, b in spans]
        pieces += [(a, b, False) for a, b in between(s, e, spans)]
    clock = paused_clock(pieces)
    return clock, clock(max(e for stage, _, _, e in times.stages if stage != "evaluate"))


def between(s: float, e: float, spans: list[Span]) -> list[Span]:
    """``[s, e)`` less the disjoint sorted ``spans``."""
    out, at = [], s
    for a, b in spans:
        if a > at:
            out.append((at, min(a, e)))
        at = max(at, b)
    if at < e:
        out.append((at, e))
    return [(a, b) for a, b in out if b > a]


def work_seconds(times: StageTimes) -> dict[tuple[str, int], float]:
    """Each stage's seconds less its loads and writes, by (stage, round)."""
    io = {k: sum(e - s for s, e in v) for k, v in io_spans(times).items()}
    return {(st, r): e - s - io.get((st, r), 0.0) for st, r, s, e in times.stages}


def io_spans(times: StageTimes) -> dict[tuple[str, int], list[Span]]:
    """A run's load-and-write spans by (stage, round), merged."""
    io: dict[tuple[str, int], list[Span]] = {}
    for stage, r, s, e in times.io:
        io.setdefault((stage, r), []).append((s, e))
    return {k: iotime.merged(v) for k, v in io.items()}


def npd_curve(run: RunSummary, limit_s: float, steps: dict[int, int]) -> NpdCurve:
    """An NPD run's curve on its clock, cut at ``limit_s``: θ_0, then every round whose
    checkpoint came in time, with the teacher tokens scored for the rounds it was trained on
    (every view, dropped samples included) and its optimizer steps (``steps`` by round); the
    seconds per stage the clock counted until then (evaluation: that of the curve's
    checkpoints, off the clock) and the tokens trained and sampled."""
    times = StageTimes.of(run)
    clock, _ = npd_clock(times)
    ends = {r: e for stage, r, _, e in times.stages if stage == "train"}
    points = [{"wall_s": 0.0, "score": run.start_score, "teacher_tokens": 0, "steps": 0}]
    covered, teacher = [], 0
    end = min(s for _, _, s, _ in times.stages)
    for x in run.rounds:
        teacher += x.teacher_tokens
        wall = clock(ends[x.round])
        if wall > limit_s:
            break
        points.append(
            {"wall_s": wall, "score": x.score, "teacher_tokens": teacher, "steps": steps[x.round]}
        )
        covered.append(x.round)
        end = ends[x.round]
    on_curve = {0, *covered}
    io = io_spans(times)
    stage_s: dict[str, float] = {}
    for stage, r, s, e in times.stages:
        if stage == "evaluate":  # off the clock (at the end): those of the curve's checkpoints
            stage_s[stage] = stage_s.get(stage, 0.0) + (e - s if r in on_curve else 0.0)
        else:
            work = between(s, e, io.get((stage, r), []))
            stage_s[stage] = stage_s.get(stage, 0.0) + sum(
                max(0.0, min(b, end) - a) for a, b in work
            )
    made = {r for stage, r, _, e in times.stages if stage == "generate" and e <= end}
    trained = sum(x.train_tokens for x in run.rounds if x.round in covered)
    generated = sum(x.generated_tokens for x in run.rounds if x.round in made)
    return NpdCurve(points, stage_s, trained, generated)
