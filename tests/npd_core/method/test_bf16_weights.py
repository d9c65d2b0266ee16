"""Pure bf16 training (``train.weights_dtype: bfloat16``): bf16 weights, float32 AdamW moments,
a loss that falls as the float32 path's does, and a checkpoint that resumes exactly."""

from __future__ import annotations

import pytest
import torch
from tiny_qwen import qwen2
from transformers import Qwen2ForCausalLM

from npd_core.config import NPDConfig, TrainConfig
from npd_core.method.optim import AdamWBF16, learner_dtype, make_optimizer
from npd_core.method.packing import Sample, collate
from npd_core.method.train import Targets, optimizer_step, train_round
from npd_core.models import load_tokenizer, rng_state, save_checkpoint
from npd_core.pipeline.learner import open_learner

K = 4
ROW_LEN = 64


def _model(dtype: torch.dtype) -> Qwen2ForCausalLM:
    """The tiny Qwen2 with two query heads on one KV head (GQA), 32 wide each."""
    return qwen2(num_attention_heads=2, head_dim=32, max_position_embeddings=128).to(dtype)


def _case(vocab: int, n: int = 12) -> tuple[list[Sample], Targets, list[list[int]]]:
    """``n`` random samples, random teacher top-K targets, packed 4 samples a row."""
    g = torch.Generator().manual_seed(0)
    samples = [
        Sample(
            torch.randint(1, vocab, (3 + i % 4,), generator=g).tolist(),
            torch.randint(1, vocab, (2 + i % 5,), generator=g).tolist(),
        )
        for i in range(n)
    ]
    lens = [len(s.response_ids) for s in samples]
    m = sum(lens)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in range(m)])  # (M, K)
    lp = torch.log_softmax(3 * torch.randn(m, K, generator=g), -1).sort(-1, descending=True)
    offsets = torch.tensor([0, *lens[:-1]]).cumsum(0).tolist()
    rows = [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    return samples, Targets(ids, lp.values, offsets), rows


def _train(model, opt, cfg: TrainConfig, start: int = 0):
    """One ``train_round`` (``cfg.steps_per_round`` steps) on :func:`_case` from ``start``."""
    samples, targets, rows = _case(model.config.vocab_size)
    return train_round(
        model, opt, samples, targets, rows, cfg.step_spec(), ROW_LEN, start_step=start,
        total_steps=100, seed=start, pad_id=0, bf16=False,
    )  # fmt: skip


def test_adamw_bf16_is_torch_adamw_on_float32_weights():
    """The same update as ``torch.optim.AdamW`` (decay, bias correction, eps) where nothing
    is rounded: float32 weights, 6 steps, weight decay on."""
    a, b = _model(torch.float32), _model(torch.float32)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), **kw), AdamWBF16(b.parameters(), **kw)
    samples, targets, rows = _case(48)
    batch = collate(samples, rows, 0, row_len=64, target_offsets=targets.offsets)
    for step in range(6):
        for m, opt in ((a, opt_a), (b, opt_b)):
            optimizer_step(m, opt, batch, targets, TrainConfig(), lr=1e-2, step=step, bf16=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-6)


def test_pure_bf16_weights_train_with_float32_state_like_the_float32_path():
    """8 steps on the whole case (3 packed rows a step): the loss falls from 3.40 to 1.11 in
    both, and bf16 moves each step's loss by < 1% (0.4% measured)."""
    cfg = TrainConfig(weights_dtype="bfloat16", lr=1e-2, warmup_steps=0, steps_per_round=8,
                      rows_per_step=3)  # fmt: skip
    ref_model = _model(torch.float32)
    ref = _train(ref_model, make_optimizer(ref_model, cfg), cfg)
    model = _model(learner_dtype(cfg.weights_dtype))
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, AdamWBF16)
    stats = _train(model, opt, cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.grad for p in model.parameters()} == {None}
    moments = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
    assert len(moments) == 2 * len(list(model.parameters()))
    assert {v.dtype for v in moments} == {torch.float32}
    losses, ref_losses = [x.loss for x in stats.log], [x.loss for x in ref.log]
    assert len(losses) == 8 and losses[-1] < 0.4 * losses[0]  # it learns
    assert losses == pytest.approx(ref_losses, rel=0.01)  # as the float32 path does


def test_bf16_learner_checkpoint_resumes_exactly(tiny_world, tmp_path):
    """``open_learner`` loads θ in bf16 and its float32 moments from the checkpoint: two steps after
    a save and a resume are the two steps the learner in memory takes."""
    cfg = NPDConfig(train=dict(weights_dtype="bfloat16", lr=1e-2, warmup_steps=0,
                               steps_per_round=2, rows_per_step=1))  # fmt: skip
    lrn, state = open_learner(str(tiny_world.student), cfg, resume=False)
    model, opt = lrn.model, lrn.optimizer
    assert lrn.step == 0 and state is None and isinstance(opt, AdamWBF16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _train(model, opt, cfg.train)
    state = dict(optimizer=opt.state_dict(), step=2, round=1, rng=rng_state())
    save_checkpoint(model, load_tokenizer(tiny_world.student), tmp_path / "ck", state)

    lrn, state = open_learner(str(tmp_path / "ck"), cfg, resume=True)
    back, back_opt = lrn.model, lrn.optimizer
    assert lrn.step == state["step"] == 2
    for p, q in zip(model.parameters(), back.parameters(), strict=True):
        assert q.dtype == torch.bfloat16 and torch.equal(p, q)
    saved = opt.state_dict()["state"]
    for i, st in back_opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].dtype == torch.float32 and torch.equal(st[key], saved[i][key])
    a = _train(model, opt, cfg.train, start=2)
    b = _train(back, back_opt, cfg.train, start=2)
    assert [x.loss for x in a.log] == [x.loss for x in b.log]
    for p, q in zip(model.parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q)


def test_weights_dtype_defaults_to_float32_master_weights():
    assert TrainConfig().weights_dtype == "float32"
    assert learner_dtype("float32") == torch.float32
    model = _model(torch.float32)
    assert type(make_optimizer(model, TrainConfig())) is torch.optim.AdamW
