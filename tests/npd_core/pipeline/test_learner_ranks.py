"""The train stage on 2 torchrun ranks (gloo, fp32): the weights of the 1-process round (DDP
within 1e-5, FSDP2 within 1e-4), also in micro-batches (``train.micro_rows``), a resume on
another number of ranks, one group of ranks for every round, a killed rank failing the round
in one line with nothing written. The ranks' lifecycle itself: test_workers.py."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npd_core.config import NPDConfig
from npd_core.errors import TrainingError
from npd_core.models import TRAINER_STATE
from npd_core.pipeline import learner, stages, workers
from npd_core.pipeline.spec import RunSpec
from npd_core.pipeline.stages import filter_stage, generate_stage, pack_stage, score_stage
from npd_core.store import Store, query

PROV = {"flow_run_id": "f", "task_run_id": "t"}
TRAIN = {"steps_per_round": 10, "rows_per_step": 4, "warmup_steps": 2}
KILL_AT = "rank1:train:1:11"  # rank 1 stops itself after step 11 of round 1 (of 12: KILLED)
KILLED = {**TRAIN, "steps_per_round": 12}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_world):
    """Rounds 1 and 2 produced up front (θ_0 generates both), one thread a stage; the module's
    ranks live in one scope, as a flow run's do, and stop at rank 1's crash point (which only
    the killed-rank test's longer round reaches)."""
    root = tmp_path_factory.mktemp("ranks")
    Store(root)
    cfg = NPDConfig.model_validate(
        dict(
            rounds=2,
            staleness=1,
            threads=1,
            models={"bf16": False},
            data={"prompts_per_round": 16},
            generate={"max_new_tokens": 24, "n_per_prompt": 2},
            filter={"rule": "none", "drop_unfinished": False},
            pack={"max_seq_len": 64},
            train=TRAIN,
        )
    )
    w = tiny_world
    spec = RunSpec(
        str(root),
        "r",
        cfg.model_dump(mode="json"),
        str(w.teacher),
        str(w.student),
        str(w.train_prompts),
        str(w.eval_prompts),
    )
    for r in (1, 2):
        for stage in (generate_stage, score_stage, filter_stage, pack_stage):
            stage(spec, r, PROV)
    with pytest.MonkeyPatch.context() as mp, workers.scope():
        mp.setenv("NPD_PAUSE_AT", KILL_AT)  # the ranks inherit it when they start
        yield spec


def _on(spec: RunSpec, nproc: int, strategy: str = "ddp", train: dict = TRAIN) -> RunSpec:
    """The run with the learner on ``nproc`` processes (``train`` for its other settings)."""
    train = {**spec.config["train"], **train, "nproc": nproc, "strategy": strategy}
    config = NPDConfig.model_validate({**spec.config, "train": train})
    return dataclasses.replace(spec, config=config.model_dump(mode="json"))


def _weights(spec: RunSpec, r: int) -> dict[str, torch.Tensor]:
    return load_file(Path(spec.checkpoint(r)) / "model.safetensors")


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _optimizer(spec: RunSpec, r: int) -> dict:
    return torch.load(Path(spec.checkpoint(r)) / TRAINER_STATE, weights_only=False)["optimizer"]


def _group(spec: RunSpec) -> workers.WorkerGroup:
    """The run's group of 2 ranks (what train_stage uses), started if none is live."""
    return workers.group(2, learner.LEARNER_RANKS, max(1, spec.stage_threads() // 2))


def test_two_ranks_train_the_one_process_round_and_resume_on_either(run):
    """θ_1 and θ_2 of 1, 2 (ddp) and 2 (fsdp) processes in several orders: the weights of the
    1-process rounds, and the full optimizer state in the 1-process layout, whoever wrote it."""
    one, ddp, fsdp = _on(run, 1), _on(run, 2, "ddp"), _on(run, 2, "fsdp")
    ref1 = stages.train_stage(one, 1, PROV).metrics
    w1, opt1 = _weights(one, 1), _optimizer(one, 1)
    stages.train_stage(one, 2, PROV)
    w2 = _weights(one, 2)

    got = stages.train_stage(ddp, 1, PROV).metrics
    assert _gap(_weights(ddp, 1), w1) <= 1e-5
    assert got.ranks == 2 and got.ranks_start_s > 0
    for key in ("steps", "train_tokens", "loss_tokens", "fill_ratio"):
        assert getattr(got, key) == getattr(ref1, key), key
    assert got.mean_loss == pytest.approx(ref1.mean_loss, abs=1e-6)
    losses = [x["loss"] for x in ref1.log]
    assert [x["loss"] for x in got.log] == pytest.approx(losses, rel=1e-5)
    opt = _optimizer(ddp, 1)
    assert opt["param_groups"] == opt1["param_groups"]
    assert opt["state"].keys() == opt1["state"].keys()
    for i, s in opt1["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt["state"][i][name], s[name], rtol=1e-3, atol=1e-6)

    resumed = stages.train_stage(fsdp, 2, PROV).metrics  # FSDP loads DDP's optimizer state
    assert _gap(_weights(fsdp, 2), w2) <= 1e-4 and resumed.ranks_start_s == 0  # same ranks

    stages.train_stage(fsdp, 1, PROV)
    assert _gap(_weights(fsdp, 1), w1) <= 1e-4
    stages.train_stage(one, 2, PROV)  # one process loads FSDP's optimizer state
    assert _gap(_weights(one, 2), w2) <= 1e-4


def test_micro_batches_on_ranks_train_the_one_forward_round(run):
    """``train.micro_rows: 1``: each of 2 ranks forwards its 2 rows of a step one at a time
    (gradients reduced on the second backward only): θ_1 is the 1-process round's in one
    forward a step (DDP within 1e-5, FSDP 1e-4; one process in micro-batches: test_train.py)."""
    one = _on(run, 1)
    stages.train_stage(one, 1, PROV)
    w1 = _weights(one, 1)
    for strategy, tolerance in (("ddp", 1e-5), ("fsdp", 1e-4)):
        spec = _on(run, 2, strategy, train={**TRAIN, "micro_rows": 1})
        assert stages.train_stage(spec, 1, PROV).metrics.steps == 10
        assert _gap(_weights(spec, 1), w1) <= tolerance, strategy


def test_per_sequence_normalisation_on_ranks_trains_the_one_process_round(run):
    """``train.normalize: sequence``: the step's sequences are counted over both ranks and
    every micro-batch before any backward, so 2 DDP ranks forwarding one row at a time train
    the 1-process round's θ_1 (within 1e-5)."""
    per_sequence = {**TRAIN, "normalize": "sequence"}
    one = _on(run, 1, train=per_sequence)
    stages.train_stage(one, 1, PROV)
    w1 = _weights(one, 1)
    spec = _on(run, 2, "ddp", train={**per_sequence, "micro_rows": 1})
    assert stages.train_stage(spec, 1, PROV).metrics.steps == 10
    assert _gap(_weights(spec, 1), w1) <= 1e-5


def test_scale_bench_trains_on_one_and_two_ranks(run, tmp_path):
    """`npd bench scale`'s learner half (npd_core/bench/scale.py) on a copy of the run, on the
    module's ranks (kept: no start to pay, so 0 s): N = 2 gives N = 1's weights within 1e-5,
    and the speedup is the ratio of the reported seconds."""
    from npd_core.bench.scale import train_arms

    shutil.copytree(run.root, tmp_path / "copy")
    res = train_arms(dataclasses.replace(run, root=str(tmp_path / "copy")), (1, 2), lambda m: None)
    one, two = res["arms"]
    assert (one["nproc"], two["nproc"]) == (1, 2) and one["steps"] == two["steps"] == 10
    assert one["torchrun_start_s"] is None and two["torchrun_start_s"] >= 0  # 0: ranks kept
    assert one["seconds"] > 0 and two["seconds"] > 0
    assert res["speedup"] == one["seconds"] / two["seconds"]
    assert res["weights_agree"] and res["weights_max_abs_diff"] <= res["tolerance"] == 1e-5


def test_a_killed_rank_fails_the_round_in_one_line_and_the_stage_runs_again(run):
    """Rank 1 stops itself mid-round and is killed: the stage fails naming it, θ_1 and its
    store row are not written, no rank is left; the stage then runs again (`npd retry` on
    new ranks: tests/flows/test_crash.py) and writes θ_1."""
    one, ddp = _on(run, 1, train=KILLED), _on(run, 2, "ddp", train=KILLED)
    stages.train_stage(one, 1, PROV)
    w1 = _weights(one, 1)
    ckpt = Path(ddp.checkpoint(1))
    for path in (ckpt, Path(ddp.root) / "runs" / "r" / "round=1" / "train"):
        shutil.rmtree(path)  # as before round 1 first trained
    group = _group(ddp)
    victim = group.pids[1]

    def kill_when_stopped() -> None:
        while _state(victim) not in ("T", None):
            time.sleep(0.05)
        if _state(victim) == "T":
            os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_stopped, daemon=True)
    killer.start()
    with pytest.raises(TrainingError) as e:
        stages.train_stage(ddp, 1, PROV)
    killer.join()
    msg = str(e.value)
    assert msg.startswith("round 1: learner rank 1 of 2 died (killed") and "\n" not in msg
    assert "torchrun log:" in msg and f"last good checkpoint: {ddp.checkpoint(0)}" in msg
    assert not ckpt.exists() and not list(ckpt.parent.glob(".round=1.*"))
    n = query(ddp.store.db_path, "select count(*) from checkpoints where round = 1")
    assert n.column(0).to_pylist() == [0]
    assert group.proc.poll() is not None and _gone(group.pids)  # no orphans after a failure
    assert group.log.is_file()  # kept for the user, whom the line points to
    shutil.rmtree(group.log.parent)

    stages.train_stage(one, 1, PROV)
    assert _gap(_weights(one, 1), w1) == 0


def _state(pid: int) -> str | None:
    """A process's state letter (R, S, T, Z, …); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _gone(pids: list[int], within_s: float = 60.0) -> bool:
    """Every process of ``pids`` exits (or is a zombie left to init) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while any(_state(p) not in (None, "Z") for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
