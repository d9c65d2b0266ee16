"""The typed results of the stages: what Prefect persists reads back as it was, a result that an
older npd persisted as a dict reads too, shards combine, and ``npd run --json`` keeps its keys."""

from __future__ import annotations

from dataclasses import replace

from prefect.serializers import JSONSerializer

from npd_core.pipeline.results import (
    EvaluateMetrics,
    FilterMetrics,
    GenerateMetrics,
    PackMetrics,
    RoundStages,
    RoundSummary,
    RunSummary,
    ScoreMetrics,
    StageResult,
    TrainMetrics,
    combined,
    digest_of,
    peak_of,
)


def _gen(
    seconds: float = 2.0, n: int = 8, refresh: float | None = None, peak: float | None = 512.0
) -> StageResult:
    m = GenerateMetrics(n, 10 * n, 5 * n, "hf", engine_refresh_s=refresh)
    spans = [(100.0, 100.5)]
    return StageResult("generate", 1, "g1", seconds, 100.0, 100.0 + seconds, m, spans, peak)


def _round() -> RoundStages:
    def res(stage: str, metrics: object, start: float) -> StageResult:
        return StageResult(stage, 1, stage[0], 1.0, start, start + 1.0, metrics)

    return RoundStages(
        generate=_gen(),
        score=res("score", ScoreMetrics(240, 1, "hf"), 102.0),
        filter=res(
            "filter",
            FilterMetrics(6, 0.75, "none", None, None, None, None, None, None, {"unfinished": 2}),
            103.0,
        ),  # fmt: skip
        pack=res("pack", PackMetrics(2, 200, 0.78125, 0), 104.0),
        train=res(
            "train", TrainMetrics(3, 200, 150, 1.25, 0.78, [{"step": 1, "loss": 1.5}]), 105.0
        ),
        evaluate=res(
            "evaluate",
            EvaluateMetrics(40.0, "exact_match", {"heldout": 40.0}, {"heldout": "exact_match"}),
            106.0,
        ),  # fmt: skip
    )


def test_a_persisted_result_reads_back_typed_through_prefects_json_serializer():
    """What the stage tasks persist (``result_serializer="json"``) comes back equal and typed."""
    s = JSONSerializer()
    for res in vars(_round()).values():
        back = s.loads(s.dumps(res))
        assert back == res and type(back.metrics) is type(res.metrics)
    assert s.loads(s.dumps([_gen(), None])) == [_gen(), None]


def test_a_result_persisted_as_a_dict_by_an_older_npd_reads_as_todays():
    """Before these types a stage's result was a dict with ``io_spans`` inside its metrics, and
    an evaluation from before eval sets had no per-set scores: both read as today's result."""
    old = {
        "stage": "evaluate",
        "round": 0,
        "digest": "abc",
        "seconds": 3.0,
        "started": 10.0,
        "ended": 13.0,
        "metrics": {"score": 41.0, "metric": "exact_match", "io_spans": [[10.0, 11.0]]},
    }
    res = StageResult.of(old)
    assert res.io_spans == [(10.0, 11.0)] and res.metrics.pruned_rounds == []
    assert res.peak_rss_mib is None  # not measured before npd_core.memory
    assert res.metrics.per_set("heldout") == EvaluateMetrics(
        41.0, "exact_match", {"heldout": 41.0}, {"heldout": "exact_match"}
    )
    assert StageResult.of(_gen().to_dict()) == _gen() and StageResult.of(_gen()) is not None
    assert digest_of(old) == "abc" == digest_of(res) and digest_of(None) == ""


def test_shards_combine_counts_summed_and_engine_seconds_the_longest():
    parts = [_gen(2.0, 8, refresh=1.0, peak=700.0), _gen(3.0, 4, refresh=4.0, peak=None)]
    m = combined(parts)
    assert (m.n_generated, m.generated_tokens, m.prompt_tokens) == (12, 120, 60)
    assert m.engine_refresh_s == 4.0 and m.shard_seconds == [2.0, 3.0]
    assert peak_of(parts) == 700.0 and peak_of(parts[1:]) is None  # the largest measured


def test_a_round_summary_is_the_rounds_json_item():
    summary = RoundSummary.of(1, _round(), "heldout")
    assert list(vars(summary)) == ROUND_KEYS
    assert summary.stage_seconds == dict.fromkeys(STAGES, 1.0) | {"generate": 2.0}
    assert (summary.teacher_tokens, summary.drop_reasons) == (240, {"unfinished": 2})
    mlflow = _round().mlflow_metrics("heldout")
    assert mlflow["score_heldout"] == 40.0 and mlflow["peak_rss_mib_generate"] == 512.0


def _run(stages: list[StageResult] | None = None, **kw: object) -> RunSummary:
    start = StageResult("evaluate", 0, "e0", 1.0, 101.0, 102.0, EvaluateMetrics(30.0, "exact"))
    rounds = [RoundSummary.of(1, _round(), "heldout")]
    fields = dict(run_id="r", mlflow_run_id="m", primary_set="heldout", registered=None)
    fields |= dict(db="/o/npd.duckdb", mlflow_uri="sqlite:///o/mlflow.db", open_s=1.0)
    stages = stages or [start, *vars(_round()).values()]
    return RunSummary.of(stages, rounds, 100.0, **fields | kw)


def test_npd_run_json_keeps_its_keys():
    """The keys of ``npd run --json`` (and of each round) are what scripts read: pinned."""
    got = RunSummary.to_json(_run(flow_wall_s=10.0, launched=98.0, returned=111.0))
    assert list(got) == RUN_KEYS and list(got["rounds"][0]) == ROUND_KEYS
    assert got["start_scores"] == {"heldout": 30.0} and got["gain_points"] == 10.0
    assert (got["wall_s"], got["startup_s"]) == (13.0, 3.0)
    assert got["peak_rss_mib"] == dict.fromkeys(STAGES) | {"generate": 512.0}


def test_a_runs_peak_rss_per_stage_is_the_largest_over_its_rounds():
    """Round 2's generation peaked higher than round 1's; round 0's evaluation counts too."""
    start = StageResult("evaluate", 0, "e0", 1.0, 101.0, 102.0, EvaluateMetrics(30.0, "x"))
    start.peak_rss_mib = 900.0
    second = replace(_gen(peak=640.0), round=2)
    stages = [start, *vars(_round()).values(), second]
    peaks = _run(stages, flow_wall_s=10.0).peak_rss_mib
    assert peaks == dict.fromkeys(STAGES) | {"generate": 640.0, "evaluate": 900.0}


def test_a_resumed_runs_overhead_counts_only_this_process_and_is_never_negative():
    """`npd retry` of a run killed mid-round printed 'orchestration overhead -11.2 s': the
    stages reused from the cache had run in the killed process, before this flow run began,
    yet counted as this flow's work. Now only this process's stages count."""
    res = _run(flow_wall_s=10.0)  # this flow run: t = 100 … 110, its rounds from t = 101
    res.reused_stages = [("generate", 1), ("score", 1)]  # the killed process's
    res.stage_intervals = [
        ("generate", 1, 10.0, 30.0),
        ("score", 1, 30.0, 50.0),
        ("train", 1, 102.0, 106.0),  # this process's
        ("evaluate", 1, 105.0, 108.0),  # overlapping: counted once
    ]
    assert res.overhead_s == 9.0 - 6.0


STAGES = ["generate", "score", "filter", "pack", "train", "evaluate"]
ROUND_KEYS = [
    "round",
    "n_generated",
    "n_kept",
    "train_tokens",
    "mean_loss",
    "score",
    "scores",
    "metrics",
    "teacher_tokens",
    "generated_tokens",
    "drop_reasons",
    "stage_seconds",
    "backends",
    "engine_refresh_s",
]
RUN_KEYS = [
    "run_id",
    "start_score",
    "start_scores",
    "primary_set",
    "final_score",
    "gain_points",
    "rounds",
    "reused_stages",
    "registered",
    "db",
    "mlflow_uri",
    "mlflow_run_id",
    "wall_s",
    "rounds_wall_s",
    "startup_s",
    "overhead_s",
    "overhead_fraction",
    "peak_rss_mib",
]
