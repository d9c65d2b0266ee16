"""A bench's saved progress: what ``npd bench --resume`` reads back, and what it refuses."""

from __future__ import annotations

import pytest

from npd_core.bench.harness import Hyper, VariantResult
from npd_core.bench.progress import Progress
from npd_core.errors import ConfigError

PLAN = {"budget_s": 140.0, "seeds": 3, "variants": "npd,sft,onpolicy", "paths": {"teacher": "t"}}


def _result(score: float) -> VariantResult:
    curve = [{"wall_s": 0.0, "score": 10.0}, {"wall_s": 70.0, "score": score}]
    return VariantResult(curve, 70.0, 1000, 200, {"train": 60.0}, {"rounds": 3}, "run-1", "m-1")


def test_resume_reads_back_every_finished_step_one_attempt_later(tmp_path):
    p = Progress(tmp_path / "bench-x", PLAN, started=123.0)
    p.calibration["4"] = {"1": {"train_s_per_row": 0.5}}
    p.chosen = {"npd": Hyper(3e-3, 4, 8)}
    p.search_scores = {"npd": [{"lr": 3e-3, "score": 40.0}]}
    p.results["npd"] = [_result(41.0), _result(42.5)]
    p.save()
    q = Progress.resume(tmp_path / "bench-x", dict(PLAN))
    assert q.attempt == 1 and q.started == 123.0 and q.plan == PLAN
    assert q.calibration == p.calibration and q.search_scores == p.search_scores
    assert q.chosen == p.chosen and q.results == p.results
    q.save()
    assert Progress.resume(tmp_path / "bench-x", PLAN).attempt == 2
    unsearched = Progress(tmp_path / "bench-y", PLAN, 0.0)
    unsearched.save()
    assert Progress.resume(tmp_path / "bench-y", PLAN).chosen is None


def test_resume_refuses_a_missing_bench_and_other_options(tmp_path):
    with pytest.raises(ConfigError, match="--resume bench-x: no .*progress.json"):
        Progress.resume(tmp_path / "bench-x", PLAN)
    Progress(tmp_path / "bench-x", PLAN, 0.0).save()
    with pytest.raises(ConfigError, match=r"planned with budget_s=140\.0, seeds=3; pass the same"):
        Progress.resume(tmp_path / "bench-x", {**PLAN, "budget_s": 60.0, "seeds": 1})
