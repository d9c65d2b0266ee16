"""Checkpoints that fit a disk (``train.keep_checkpoints``, npd_core.pipeline.retention): the
rule that picks the rounds to delete; a run's rounds evaluated one by one keep the best and the
last N rounds' weights and the latest round's optimizer state only; `npd status` and `npd export`
on a run with pruned rounds; what a kill in the middle of a deletion leaves."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from npd_core.config import NPDConfig
from npd_core.errors import StoreUsageError
from npd_core.models import TRAINER_STATE
from npd_core.pipeline.retention import prune, pruned_rounds
from npd_core.pipeline.spec import RunSpec
from npd_core.store import Store, table_from_rows

runner = CliRunner()
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("evaluated", "best", "k", "keep", "staleness", "want"),
    [
        ({1, 2, 3}, 2, 3, None, 0, set()),  # default: every round stays
        ({1, 2, 3}, 2, 3, 1, 0, {1}),  # 2 is the best, 3 the last
        ({1, 2, 3, 4}, None, 4, 2, 0, {1, 2}),  # θ_0 the best: the last 2 stay
        ({1, 2, 3}, None, 3, 1, 1, {1}),  # θ_2 still generates D_4 (staleness 1)
        ({1, 2, 3, 4, 5}, None, 5, 1, 2, {1, 2, 3, 4}),  # the last round: no generator left
        ({2, 3}, None, 3, 1, 0, {2}),  # θ_1 not evaluated yet (eval.when: end)
        ({1, 2, 3}, 1, 3, 5, 0, set()),  # fewer rounds than N
    ],
)
def test_pruned_rounds(evaluated, best, k, keep, staleness, want):
    assert pruned_rounds(evaluated, best, k, keep, staleness, rounds=5) == want


def _spec(root: Path, world, keep: int | None, staleness: int = 1) -> RunSpec:
    """Run 'a' of 4 rounds in a new store, its runs row written."""
    train = {"keep_checkpoints": keep}
    cfg = NPDConfig(rounds=4, staleness=staleness, train=train).model_dump(mode="json")
    store = Store(root)
    row = dict(run_id="a", status="running", config_json=json.dumps(cfg), config_hash="h")
    store.write_run({**row, "created_at": NOW})
    return RunSpec(str(root), "a", cfg, str(world.teacher), str(world.student), "p", "e")


def _trained(spec: RunSpec, r: int, source: Path) -> None:
    """θ_r as train_stage leaves it: weights and optimizer state, and its checkpoints row."""
    ckpt = Path(spec.checkpoint(r))
    shutil.copytree(source, ckpt)
    (ckpt / TRAINER_STATE).write_bytes(b"adam")
    row = dict(run_id="a", round=r, path=f"runs/a/checkpoints/round={r}", step=r, train_tokens=r)
    table = table_from_rows("checkpoints", [{**row, "created_at": NOW}])
    spec.store.write_stage("a", r, "train", {"checkpoints": table})


def _evaluated(spec: RunSpec, r: int, score: float) -> list[int]:
    """θ_r's evals row (as evaluate_stage writes it), then the pruning evaluate_stage does."""
    row = dict(run_id="a", round=r, eval_set="heldout", checkpoint=spec.checkpoint(r))
    row |= dict(metric="exact_match", score=score, n=8, created_at=NOW)
    spec.store.write_stage("a", r, "evaluate", {"evals": table_from_rows("evals", [row])})
    return prune(spec, r)


def _on_disk(spec: RunSpec) -> tuple[list[int], list[int]]:
    """Rounds ≥ 1 with weights, rounds with an optimizer state."""
    dirs = sorted((Path(spec.root) / "runs" / "a" / "checkpoints").glob("round=*"))
    weights = [int(d.name[6:]) for d in dirs if (d / "config.json").is_file()]
    states = [int(d.name[6:]) for d in dirs if (d / TRAINER_STATE).is_file()]
    return sorted(weights), sorted(states)


def test_a_run_keeps_the_best_the_last_round_and_one_optimizer_state(tmp_path, tiny_world):
    """keep_checkpoints 1, staleness 1 (the default), scores 10, 40, 20, 30, 25 for θ_0…θ_4:
    θ_1 (40) is the best from round 2 on; θ_2 generates D_4, so it stays until round 4 is
    evaluated, when rounds 2 and 3 go; every optimizer state but the latest round's goes as soon
    as that round is evaluated."""
    spec = _spec(tmp_path, tiny_world, keep=1)
    assert _evaluated(spec, 0, 10.0) == []
    seen = []
    for r, score in enumerate([40.0, 20.0, 30.0, 25.0], start=1):
        _trained(spec, r, tiny_world.student)
        pruned = _evaluated(spec, r, score)
        seen.append((pruned, *_on_disk(spec)))
    assert seen == [
        ([], [1], [1]),
        ([], [1, 2], [2]),  # θ_1 is the best
        ([], [1, 2, 3], [3]),  # θ_2 generates D_4
        ([2, 3], [1, 4], [4]),
    ]
    assert (tiny_world.student / "config.json").is_file()  # θ_0 is never touched
    assert _evaluated(spec, 4, 25.0) == []  # a retried evaluation prunes nothing more
    assert not list((tmp_path / "runs" / "a").rglob(".*trash*"))


def test_the_default_keeps_every_rounds_weights(tmp_path, tiny_world):
    spec = _spec(tmp_path, tiny_world, keep=None)
    for r, score in enumerate([40.0, 20.0, 30.0], start=1):
        _trained(spec, r, tiny_world.student)
        assert _evaluated(spec, r, score) == []
    assert _on_disk(spec) == ([1, 2, 3], [3])


def test_status_and_export_after_pruning(tmp_path, tiny_world):
    """`npd status` marks the pruned rounds; `npd export` exports the best and any round with
    weights, and refuses a pruned round in one line that names the rounds it can export."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    spec = _spec(out, tiny_world, keep=1, staleness=0)
    _evaluated(spec, 0, 10.0)
    for r, score in enumerate([40.0, 20.0, 30.0], start=1):
        _trained(spec, r, tiny_world.teacher if r == 1 else tiny_world.student)
        _evaluated(spec, r, score)
    shown = runner.invoke(app, ["status", "a", "--out", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    (run,) = json.loads(shown.stdout)
    assert [(x["round"], x["weights"]) for x in run["rounds"]] == [
        (0, True),
        (1, True),
        (2, False),
        (3, True),
    ]
    assert run["best_round"] == 1
    table = runner.invoke(app, ["status", "a", "--out", str(out)])
    assert table.exit_code == 0 and "pruned" in table.stdout

    best = runner.invoke(app, ["export", "a", str(tmp_path / "best"), "--out", str(out), "--json"])
    assert best.exit_code == 0, best.output
    assert json.loads(best.stdout)["round"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world.teacher)
    assert model.num_parameters() == teacher.num_parameters()  # round 1 is a copy of it
    last = ["export", "a", str(tmp_path / "r3"), "--round", "3", "--out", str(out)]
    assert runner.invoke(app, last).exit_code == 0
    gone = ["export", "a", str(tmp_path / "r2"), "--round", "2", "--out", str(out)]
    res = runner.invoke(app, gone)
    assert isinstance(res.exception, StoreUsageError) and res.exception.exit_code == 2
    assert "round 2: its weights were deleted" in str(res.exception)
    assert "rounds with weights: [0, 1, 3]" in str(res.exception)
    assert not (tmp_path / "r2").exists()


def test_a_kill_between_rename_and_delete_leaves_hidden_trash_that_the_sweep_removes(
    tmp_path, tiny_world, monkeypatch
):
    """The pruned checkpoint is renamed away before it is deleted: stopped there (as a kill -9
    would leave it), readers see no round=2 folder, and the run's sweep removes the trash."""
    spec = _spec(tmp_path, tiny_world, keep=1, staleness=0)
    for r, score in enumerate([40.0, 20.0], start=1):
        _trained(spec, r, tiny_world.student)
        _evaluated(spec, r, score)
    _trained(spec, 3, tiny_world.student)

    class Killed(Exception):
        pass

    def killed(point: str) -> None:
        if point == "prune:3":
            raise Killed

    monkeypatch.setattr("npd_core.pipeline.retention.pause_point", killed)
    with pytest.raises(Killed):
        _evaluated(spec, 3, 30.0)
    ckpts = tmp_path / "runs" / "a" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("round=*")) == ["round=1", "round=3"]
    (trash,) = ckpts.glob(".round=2.trash-*")
    assert spec.store.sweep("a") == [trash] and not trash.exists()
