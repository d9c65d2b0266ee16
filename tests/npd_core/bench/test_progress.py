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
    p.points["npd/0/{}"] = 40.0
    p.save()
    q = Progress.resume(tmp_path / "bench-x", dict(PLAN))
    assert q.points == {"npd/0/{}": 40.0}
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


def test_a_search_stopped_part_way_replays_its_finished_runs(tmp_path):
    """Each search run's score is saved as it finishes; a resumed bench returns the saved
    scores without running them again and runs only the rest."""
    ran: list[str] = []

    def run(key: str, score: float):
        return lambda: ran.append(key) or score

    p = Progress(tmp_path / "b", PLAN, 0.0)
    assert p.scored("npd/0/a", run("npd/0/a", 40.0)) == 40.0
    assert p.scored("npd/1/b", run("npd/1/b", 42.0)) == 42.0  # then the process stops
    q = Progress.resume(tmp_path / "b", PLAN)
    assert [q.scored(k, run(k, 0.0)) for k in ("npd/0/a", "npd/1/b", "npd/2/c")] == [40, 42, 0]
    assert ran == ["npd/0/a", "npd/1/b", "npd/2/c"]
    assert Progress.resume(tmp_path / "b", PLAN).points["npd/2/c"] == 0.0


def test_a_bench_saved_without_search_points_resumes(tmp_path):
    import json

    Progress(tmp_path / "b", PLAN, 0.0).save()
    f = tmp_path / "b" / "progress.json"
    saved = json.loads(f.read_text())
    del saved["points"]
    f.write_text(json.dumps(saved))
    assert Progress.resume(tmp_path / "b", PLAN).points == {}


def test_the_world_digest_follows_the_weights_not_where_they_lie(tmp_path):
    """A bench carried to another machine resumes on a rebuilt world only if its files are the
    same bytes (``world_digest`` is one of the knobs a resume must match)."""
    import shutil

    from npd_core.bench.plan import world_digest

    a = tmp_path / "a"
    (a / "teacher").mkdir(parents=True)
    (a / "teacher" / "model.safetensors").write_bytes(b"\x00\x01" * 100)
    (a / "train.jsonl").write_text('{"prompt": "x"}\n')

    def paths(root):
        return {"teacher": str(root / "teacher"), "train_prompts": str(root / "train.jsonl")}

    shutil.copytree(a, tmp_path / "b")
    assert world_digest(paths(a)) == world_digest(paths(tmp_path / "b"))
    (tmp_path / "b" / "teacher" / "model.safetensors").write_bytes(b"\x00\x02" * 100)
    assert world_digest(paths(a)) != world_digest(paths(tmp_path / "b"))
    assert world_digest(paths(a)) != world_digest({**paths(a), "student": str(tmp_path / "no")})
