"""TRL as an external peer: the runner trains on our world and is set up like our on-policy."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from npd_core.baselines import peers
from npd_core.config import NPDConfig
from npd_core.data import read_prompts
from npd_core.errors import ConfigError
from npd_core.method import losses
from npd_core.method.optim import lr_at, make_optimizer
from npd_core.models import load_model, load_tokenizer, use_bf16

needs_trl = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason=f"needs the peers extra (TRL): {peers.INSTALL}"
)


def test_missing_peer_is_one_line_naming_the_install_command(monkeypatch):
    monkeypatch.setitem(peers.PEERS, "trl", "npd_no_such_module")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[peers\]'") as e:
        peers.require("trl")
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    with pytest.raises(ConfigError, match="unknown peer 'vllm'"):
        peers.require("vllm")


@pytest.fixture
def world_prompts(tiny_world):
    return read_prompts(tiny_world.train_prompts), read_prompts(tiny_world.eval_prompts)


@pytest.mark.peers
@needs_trl
def test_trl_trains_a_few_steps_and_returns_a_curve(tiny_world, world_prompts):
    from npd_core.baselines.peers.trl_peer import run_trl

    cfg = NPDConfig(threads=1)  # one thread on this shared 2-core box
    train, held = world_prompts
    kw = dict(
        teacher=str(tiny_world.teacher),
        student=str(tiny_world.student),
        train_prompts=train,
        eval_prompts=held,
        prompts_per_step=8,
    )
    res = run_trl(cfg, max_steps=4, budget_s=600, eval_at=[1e-3], **kw)
    assert res.steps == 4
    walls = [p["wall_s"] for p in res.curve]
    assert walls[0] == 0 and walls == sorted(walls) and len(walls) == 3  # start, checkpoint, end
    assert res.wall_s == walls[-1] > 0
    assert all(0 <= p["score"] <= 100 for p in res.curve)
    assert res.final_score == res.curve[-1]["score"]
    # 4 steps × 8 prompts × at most max_new_tokens each; training also sees the prompts
    assert 32 <= res.generated_tokens <= 32 * cfg.generate.max_new_tokens
    assert res.train_tokens > res.generated_tokens
    assert set(res.stage_seconds) == {"generate", "train", "evaluate"}
    assert res.stage_seconds["generate"] + res.stage_seconds["train"] == pytest.approx(res.wall_s)
    assert res.settings["trainer"] == "DistillationTrainer" and res.settings["max_steps"] == 4

    # the budget stops training after the step that crosses it, whatever max_steps says
    short = run_trl(cfg, max_steps=50, budget_s=0.0, eval_at=[], **kw)
    assert short.steps == 1 and len(short.curve) == 2


@pytest.mark.peers
@needs_trl
@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)])
def test_trl_settings_match_ours(tiny_world, tmp_path, loss, beta):
    from npd_core.baselines.peers.trl_peer import _Schedule, _Trainer, trl_args

    cfg = NPDConfig.model_validate(
        {"train": {"loss": loss, "beta": 0.3, "lr": 2e-3, "warmup_steps": 3, "weight_decay": 0.01}}
    )
    args, settings = trl_args(cfg, prompts_per_step=12, max_steps=20, output_dir=str(tmp_path))
    assert args.beta == beta
    assert args.learning_rate == cfg.train.lr and args.max_grad_norm == cfg.train.grad_clip
    assert args.weight_decay == cfg.train.weight_decay
    model = load_model(tiny_world.student)
    ours = make_optimizer(model, cfg.train).defaults
    assert (args.adam_beta1, args.adam_beta2) == ours["betas"] and args.adam_epsilon == ours["eps"]
    assert args.per_device_train_batch_size == 12 and args.gradient_accumulation_steps == 1
    assert args.max_completion_length == cfg.generate.max_new_tokens
    assert (args.temperature, args.top_p, args.top_k) == (cfg.generate.temperature, 1.0, 0)
    assert args.bf16 == use_bf16(cfg.models.bf16) and not args.gradient_checkpointing
    assert args.report_to == []  # "none": no wandb, no trackio
    assert not args.push_to_hub and settings["lr_scheduler"] == "npd_core.method.optim.lr_at"

    from datasets import Dataset

    trainer = _Trainer(
        model=model,
        teacher_model=load_model(tiny_world.teacher),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["12,34="]}),
        processing_class=load_tokenizer(tiny_world.student),
        schedule=_Schedule(cfg.train, 20),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    got = []
    for _ in range(20):
        got.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert got == pytest.approx([lr_at(s, cfg.train, 20) for s in range(20)])


@pytest.mark.peers
@needs_trl
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_trl_loss_equals_ours_when_top_k_covers_the_vocabulary(beta):
    """TRL's full-vocabulary JSD(β) and our top-k losses agree when k = V (the toy world)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    g = torch.Generator().manual_seed(0)
    B, K, H, V = 3, 5, 8, 15
    h_s, h_t = torch.randn(B, K, H, generator=g), torch.randn(B, K, H, generator=g)
    w_s, w_t = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    mask = torch.ones(B, K)
    mask[0, 3:] = 0  # right padding of a short completion
    theirs, _, n = _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta)
    z_s = (h_s @ w_s.T)[mask.bool()]  # (N, V)
    logp_t = torch.log_softmax((h_t @ w_t.T)[mask.bool()], -1)  # (N, V)
    ids = logp_t.argsort(-1, descending=True)  # top-k with k = V
    top = logp_t.gather(-1, ids)
    ours = {
        0.0: losses.forward_kl_topk(z_s, ids, top),
        1.0: losses.reverse_kl(z_s, ids, top),
        0.5: losses.generalized_jsd(z_s, ids, top, 0.5),
    }[beta]
    assert int(n) == 13
    assert theirs.item() == pytest.approx(losses.token_mean(ours, 13).item(), rel=1e-5)


@pytest.mark.peers
@needs_trl
def test_lr_horizon_is_fixed_after_calibration_as_onpolicy_fixes_it():
    """After max(warmup, 5) steps taking 10 s of a 30 s budget: 5 + 20 / 2 = 15 steps."""
    import time

    from transformers import TrainerControl, TrainerState

    from npd_core.baselines.peers.trl_peer import _Clock, _Schedule

    cfg = NPDConfig.model_validate({"train": {"warmup_steps": 2}})
    sched = _Schedule(cfg.train)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(opt, sched.factor)
    clock = _Clock(30.0, [], lambda: 0.0, sched)
    control = TrainerControl()
    clock.train_s, clock._resumed = 10.0, time.perf_counter()
    clock.on_step_end(None, TrainerState(global_step=4), control, opt, lambda_lr)
    assert sched.horizon is None  # 4 < 5 calibration steps
    clock.on_step_end(None, TrainerState(global_step=5), control, opt, lambda_lr)
    assert sched.horizon == 15 and not control.should_training_stop
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(5, cfg.train, 15))
    clock.train_s = 30.0
    clock.on_step_end(None, TrainerState(global_step=6), control, opt, lambda_lr)
    assert control.should_training_stop and sched.horizon == 15


@pytest.mark.peers
@needs_trl
def test_the_bench_json_states_what_trl_optimises_beside_ours(tmp_path):
    """variants.trl.settings.effective: TRL 1.16's JSD(β) over the full vocabulary, per token,
    λ = 1, beside our loss, β, λ (1 − data.mix.fraction) and the teacher's top-k; the losses
    and normalisation TRL has no twin of are refused in one line."""
    from npd_core.baselines.peers.trl_peer import trl_args

    over = {
        "train": {"loss": "jsd", "beta": 0.3, "rest_mass": True},
        "data": {"mix": {"fraction": 0.25}},
    }
    cfg = NPDConfig.model_validate(over)
    _, settings = trl_args(cfg, prompts_per_step=4, max_steps=2, output_dir=str(tmp_path))
    assert settings["effective"] == {
        "loss": "generalized_jsd",
        "beta": 0.3,
        "lmbda": 1.0,
        "vocabulary_coverage": "full",
        "normalize": "token",
        "ours": {
            "loss": "jsd",
            "beta": 0.3,
            "lmbda": 0.75,
            "vocabulary_coverage": "teacher top-16 + rest bucket",
            "normalize": "token",
        },
    }
    for train, field in (
        ({"loss": "sampled_reverse_kl"}, "train.loss"),
        ({"normalize": "sequence"}, "train.normalize"),
    ):
        cfg = NPDConfig.model_validate({"train": train})
        with pytest.raises(ConfigError, match=field):
            trl_args(cfg, prompts_per_step=4, max_steps=2, output_dir=str(tmp_path))
