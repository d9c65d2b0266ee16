"""What the stages of a run produce, as typed results: one metrics class per stage inside a
``StageResult`` (which round, what it wrote, when it ran), the six of a round together
(``RoundStages``), what a round reports (``RoundSummary``) and what a run reports
(``RunSummary``, whose ``to_json`` is ``npd run --json``'s object).

The stages build these; tasks persist them (Prefect's JSON serializer records the class, and
validation comes back through :meth:`StageResult.of`); tasks, flows, the CLI and the bench read
them. A result that an older npd persisted as a plain dict (a run begun before these types)
reads back through the same :meth:`StageResult.of`. Adding a round metric: compute it in its
stage (``stages.py``) and give it a field here, and, to report it, a line in ``RoundSummary.of``
or ``RoundStages.mlflow_metrics``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Generic, TypeVar

from pydantic_core import core_schema

from npd_core import iotime

Span = tuple[float, float]  # (start, end), time.time()
Interval = tuple[str, int, float, float]  # (stage, round, start, end)


@dataclass
class GenerateMetrics:
    n_generated: int
    generated_tokens: int
    prompt_tokens: int
    backend: str  # "hf" or "vllm" (``backend: auto`` decides at run time)
    engine_start_s: float | None = None  # vLLM only: starting the engine
    engine_refresh_s: float | None = None  # vLLM only: loading the round's snapshot
    shard_seconds: list[float] | None = None  # written in shards: each shard's seconds
    commit_s: float | None = None  # written in shards: the commit's seconds


@dataclass
class ScoreMetrics:
    scored_tokens: int  # every view the teacher read, dropped samples included
    views: int  # 2 when the filter needs the prompt-less views, else 1
    backend: str
    teacher_engine_start_s: float | None = None
    teacher_engine_refresh_s: float | None = None
    student_engine_start_s: float | None = None
    student_engine_refresh_s: float | None = None
    shard_seconds: list[float] | None = None
    commit_s: float | None = None


@dataclass
class FilterMetrics:
    n_kept: int
    kept_fraction: float
    rule: str
    band_low: float | None  # the rule's kept band on its score (None: open on that side)
    band_high: float | None
    dropped_kl_share: float | None  # share of the student's KL in the dropped rows
    delta_ifd_q05: float | None  # None when the round computed no Δ-IFD
    delta_ifd_q50: float | None
    delta_ifd_q95: float | None
    drop_reasons: dict[str, int] = field(default_factory=dict)  # reason → rows


@dataclass
class PackMetrics:
    rows: int
    packed_tokens: int
    fill_ratio: float
    dropped_overlong: int


@dataclass
class TrainMetrics:
    steps: int
    train_tokens: int
    loss_tokens: int
    mean_loss: float | None
    fill_ratio: float
    log: list[dict[str, Any]] = field(default_factory=list)  # per optimizer step (StepLog)
    ranks: int | None = None  # train.nproc > 1: how many torchrun ranks ran
    ranks_start_s: float | None = None  # and how long starting them took (0 when kept)


@dataclass
class EvaluateMetrics:
    score: float  # the primary set's: what the round reports and the bench's curves read
    metric: str
    scores: dict[str, float] | None = None  # per eval set (None: persisted before eval sets)
    metrics: dict[str, str] | None = None
    pruned_rounds: list[int] = field(default_factory=list)  # weights deleted (keep_checkpoints)

    def per_set(self, primary: str) -> EvaluateMetrics:
        """With ``scores``/``metrics`` per eval set, also for a result persisted before eval
        sets (a resumed run's cache): its one set, under the name of the run's primary set."""
        if self.scores is not None and self.metrics is not None:
            return self
        return replace(self, scores={primary: self.score}, metrics={primary: self.metric})


METRICS: dict[str, type] = {
    "generate": GenerateMetrics,
    "score": ScoreMetrics,
    "filter": FilterMetrics,
    "pack": PackMetrics,
    "train": TrainMetrics,
    "evaluate": EvaluateMetrics,
}
ADDITIVE = ("n_generated", "generated_tokens", "prompt_tokens", "scored_tokens")  # over shards

M = TypeVar("M")


@dataclass
class StageResult(Generic[M]):
    """One stage of one round: what it wrote (``digest``: downstream cache keys use it), when
    it ran, its metrics, the spans it spent loading models and moving bytes
    (``npd_core.iotime``; the bench's clocks leave them out) and the peak RSS of the process
    that ran it, during it (``npd_core.memory``; ``None``: not measured, as in a result
    persisted before it was). The baselines' training segments keep a plain dict of metrics."""

    stage: str
    round: int
    digest: str
    seconds: float
    started: float
    ended: float
    metrics: M
    io_spans: list[Span] = field(default_factory=list)
    peak_rss_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, x: StageResult | dict[str, Any]) -> StageResult:
        """``x`` itself, or the result a dict holds: today's ``to_dict`` or the format npd
        persisted before these types (``io_spans`` inside the metrics; keys it no longer
        has are ignored, keys it did not have yet take their defaults)."""
        if isinstance(x, StageResult):
            return x
        m = dict(x["metrics"])
        spans = x.get("io_spans", m.pop("io_spans", []))
        kind = METRICS[x["stage"]]
        known = {f.name for f in fields(kind)}
        metrics = kind(**{k: v for k, v in m.items() if k in known})
        times = (x["seconds"], x["started"], x["ended"])
        spans = [tuple(s) for s in spans]
        return cls(
            x["stage"], x["round"], x["digest"], *times, metrics, spans, x.get("peak_rss_mib")
        )

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        """Validation (a Prefect result read back, a deployment's parameter) through ``of``."""
        to_dict = core_schema.plain_serializer_function_ser_schema(asdict)
        return core_schema.no_info_plain_validator_function(cls.of, serialization=to_dict)


def digest_of(x: StageResult | dict[str, Any] | None) -> str:
    """The digest of a stage's result in any form (a baseline's segment is a plain dict)."""
    if x is None:
        return ""
    return x.digest if isinstance(x, StageResult) else str(x.get("digest", ""))


def peak_of(results: list[StageResult]) -> float | None:
    """The largest peak RSS among ``results``: a stage written in shards (each shard measured
    in the process that ran it), or one stage over the rounds (``None``: none measured)."""
    return max((x.peak_rss_mib for x in results if x.peak_rss_mib is not None), default=None)


def combined(parts: list[StageResult]) -> Any:
    """The metrics of a stage written in shards: counts summed, engine seconds the longest (the
    engines ran side by side), each shard's seconds listed."""
    ms = [p.metrics for p in parts]
    names = [f.name for f in fields(ms[0])]
    summed = {k: sum(getattr(m, k) for m in ms) for k in ADDITIVE if k in names}
    engines = [k for k in names if "engine" in k and getattr(ms[0], k) is not None]
    longest = {k: max(getattr(m, k) for m in ms) for k in engines}
    return replace(ms[0], **summed, **longest, shard_seconds=[p.seconds for p in parts])


@dataclass
class RoundStages:
    """The six stage results of round r ≥ 1."""

    generate: StageResult[GenerateMetrics]
    score: StageResult[ScoreMetrics]
    filter: StageResult[FilterMetrics]
    pack: StageResult[PackMetrics]
    train: StageResult[TrainMetrics]
    evaluate: StageResult[EvaluateMetrics]

    @classmethod
    def of(cls, results: dict[str, StageResult | dict[str, Any]]) -> RoundStages:
        return cls(**{f.name: StageResult.of(results[f.name]) for f in fields(cls)})

    def seconds(self) -> dict[str, float]:
        """Each stage's seconds, in the round's order, to the millisecond."""
        return {f.name: round(getattr(self, f.name).seconds, 3) for f in fields(self)}

    def peak_rss_mib(self) -> dict[str, float | None]:
        """Each stage's peak RSS in MiB (``None``: not measured), in the round's order."""
        return {f.name: getattr(self, f.name).peak_rss_mib for f in fields(self)}

    def rounds_row(self) -> dict[str, Any]:
        """The round's columns of the store's ``rounds`` table (less run id and provenance)."""
        flt, trn = self.filter.metrics, self.train.metrics
        return dict(
            n_generated=self.generate.metrics.n_generated,
            n_kept=flt.n_kept,
            train_tokens=trn.train_tokens,
            mean_loss=trn.mean_loss,
            score=self.evaluate.metrics.score,
            kept_fraction=flt.kept_fraction,
            filter_rule=flt.rule,
            dropped_kl_share=flt.dropped_kl_share,
            delta_ifd_q05=flt.delta_ifd_q05,
            delta_ifd_q50=flt.delta_ifd_q50,
            delta_ifd_q95=flt.delta_ifd_q95,
        )

    def mlflow_metrics(self, primary: str) -> dict[str, float]:
        """The round's MLflow metrics: scores (``score`` the primary set's, ``score_<set>``
        each set's), what the filter kept, training, teacher tokens, stage seconds and peak
        RSS."""
        flt, trn = self.filter.metrics, self.train.metrics
        return {
            **eval_metrics(self.evaluate.metrics.per_set(primary)),
            "kept_fraction": flt.kept_fraction,
            "n_kept": flt.n_kept,
            "dropped_kl_share": flt.dropped_kl_share,
            "train_tokens": trn.train_tokens,
            "mean_loss": trn.mean_loss,
            "fill_ratio": self.pack.metrics.fill_ratio,
            "teacher_tokens": self.score.metrics.scored_tokens,
            "delta_ifd_q05": flt.delta_ifd_q05,
            "delta_ifd_q50": flt.delta_ifd_q50,
            "delta_ifd_q95": flt.delta_ifd_q95,
            **{f"seconds_{k}": v for k, v in self.seconds().items()},
            **{f"peak_rss_mib_{k}": v for k, v in self.peak_rss_mib().items()},
        }


def eval_metrics(evaluation: EvaluateMetrics) -> dict[str, float]:
    """An evaluation as MLflow metrics: ``score`` (the primary set's) and ``score_<set>`` per
    eval set (``evaluation`` with its sets: :meth:`EvaluateMetrics.per_set`)."""
    return {"score": evaluation.score} | {f"score_{k}": v for k, v in evaluation.scores.items()}


@dataclass
class RoundSummary:
    """What round r reports: an item of ``rounds`` in ``npd run --json``, a Prefect table."""

    round: int
    n_generated: int
    n_kept: int
    train_tokens: int
    mean_loss: float | None
    score: float  # the primary set's
    scores: dict[str, float]  # per eval set
    metrics: dict[str, str]
    teacher_tokens: int  # every view, dropped samples included
    generated_tokens: int
    drop_reasons: dict[str, int]
    stage_seconds: dict[str, float]
    backends: dict[str, str]  # generate's and score's engine
    engine_refresh_s: float | None  # vLLM: loading the round's snapshot

    @classmethod
    def of(cls, r: int, stages: RoundStages, primary: str) -> RoundSummary:
        gen, ev = stages.generate.metrics, stages.evaluate.metrics.per_set(primary)
        return cls(
            round=r,
            n_generated=gen.n_generated,
            n_kept=stages.filter.metrics.n_kept,
            train_tokens=stages.train.metrics.train_tokens,
            mean_loss=stages.train.metrics.mean_loss,
            score=ev.score,
            scores=ev.scores,
            metrics=ev.metrics,
            teacher_tokens=stages.score.metrics.scored_tokens,
            generated_tokens=gen.generated_tokens,
            drop_reasons=stages.filter.metrics.drop_reasons,
            stage_seconds=stages.seconds(),
            backends={"generate": gen.backend, "score": stages.score.metrics.backend},
            engine_refresh_s=gen.engine_refresh_s,
        )


@dataclass
class RunSummary:
    """What a run reports (``distill_flow``'s return): scores from θ_0 to the last round, the
    round summaries, what came from an earlier process's cache, every stage's wall-time
    interval with the loads and byte moves inside them, which the bench's clocks read, and each
    stage's peak RSS over the rounds (``peak_rss_mib``: stage → MiB, ``None`` where none was
    measured).
    ``launched``/``returned``: when the caller started the flow and got this back (the CLI
    sets them; ``wall_s`` and ``startup_s`` need them)."""

    run_id: str
    mlflow_run_id: str
    primary_set: str  # the eval set of start_score and final_score
    start: EvaluateMetrics  # θ_0, per set
    rounds: list[RoundSummary]
    reused_stages: list[tuple[str, int]]  # (stage, round) run by an earlier process
    registered: dict[str, str] | None  # {name, version} in the MLflow Model Registry
    db: str
    mlflow_uri: str
    flow_started: float  # time.time()
    open_s: float  # opening the run (store rows, MLflow run)
    flow_wall_s: float
    stage_intervals: list[Interval]
    io_intervals: list[Interval]  # loads and byte moves inside those stages
    launched: float | None = None
    returned: float | None = None
    peak_rss_mib: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def of(
        cls, stages: list[StageResult], rounds: list[RoundSummary], flow_started: float, **kw: Any
    ) -> RunSummary:
        """From every stage result of the run (θ_0's evaluation among them): a stage that
        started before this flow run did was run by an earlier process (a killed or failed
        run resumed by a retry), so its result came from the cache."""
        start = next(x for x in stages if x.stage == "evaluate" and x.round == 0)
        return cls(
            start=start.metrics.per_set(kw["primary_set"]),
            rounds=rounds,
            reused_stages=[(x.stage, x.round) for x in stages if x.started < flow_started],
            flow_started=flow_started,
            stage_intervals=[(x.stage, x.round, x.started, x.ended) for x in stages],
            io_intervals=[(x.stage, x.round, s, e) for x in stages for s, e in x.io_spans],
            peak_rss_mib={n: peak_of([x for x in stages if x.stage == n]) for n in METRICS},
            **kw,
        )

    @property
    def start_score(self) -> float:
        return self.start.score

    @property
    def final_score(self) -> float:
        return self.rounds[-1].score

    @property
    def rounds_wall_s(self) -> float:
        return self.flow_wall_s - self.open_s

    @property
    def overhead_s(self) -> float:
        """Seconds of the flow's rounds in which none of this process's stages ran:
        orchestration overhead. Stages reused from an earlier process's cache (a resumed run)
        ran outside this flow's time, so they do not count."""
        reused = set(self.reused_stages)
        ran = [(s, e) for st, r, s, e in self.stage_intervals if (st, r) not in reused]
        return self.rounds_wall_s - sum(e - s for s, e in iotime.merged(ran))

    def to_json(self) -> dict[str, Any]:
        """``npd run --json``'s object (``launched`` and ``returned`` set)."""
        assert self.launched is not None and self.returned is not None
        wall = self.returned - self.launched
        startup = self.flow_started - self.launched + self.open_s
        overhead = self.overhead_s
        return {
            "run_id": self.run_id,
            "start_score": self.start_score,
            "start_scores": self.start.scores,  # θ_0 on every eval set
            "primary_set": self.primary_set,
            "final_score": self.final_score,
            "gain_points": self.final_score - self.start_score,
            "rounds": [asdict(x) for x in self.rounds],
            "reused_stages": [list(x) for x in self.reused_stages],
            "registered": self.registered,
            "db": self.db,
            "mlflow_uri": self.mlflow_uri,
            "mlflow_run_id": self.mlflow_run_id,
            "wall_s": round(wall, 2),
            "rounds_wall_s": round(self.rounds_wall_s, 2),
            "startup_s": round(startup, 2),
            "overhead_s": round(overhead, 2),
            "overhead_fraction": round(overhead / max(self.rounds_wall_s, 1e-9), 4),
            "peak_rss_mib": self.peak_rss_mib,  # stage → the process's peak RSS during it, MiB
        }
