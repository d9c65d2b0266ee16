"""The learner: a round lowers the loss on the rows it trains on; a non-finite loss stops the
round with a clear error and leaves weights alone; the lr schedule."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from npd_core.config import PackConfig, TrainConfig
from npd_core.errors import TrainingError
from npd_core.method.losses import token_mean
from npd_core.method.packing import Sample, collate, packed_rows
from npd_core.method.train import Targets, lr_at, make_optimizer, per_token_loss, train_round


def _model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=12,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )


def _data(n: int = 6):
    samples = [Sample([1, 2 + i % 3], [3, 4, 5][: 1 + i % 3]) for i in range(n)]
    m = sum(len(s.response_ids) for s in samples)
    ids = torch.arange(4).repeat(m, 1)
    return samples, ids, m


def test_one_round_lowers_the_loss_on_a_fixed_batch():
    """Every step of the round takes the same packed row (all six samples): the real
    ``train_round`` → ``optimizer_step`` path leaves the forward-KL loss on it lower."""
    model = _model()
    samples, ids, m = _data()
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(m, 4, generator=g), -1).sort(-1, descending=True)
    targets = Targets(ids, lp.values, [0, 1, 3, 6, 7, 9])
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, steps_per_round=8, rows_per_step=1)
    pack = PackConfig(max_seq_len=32)
    rows = [list(range(len(samples)))]  # one row: the fixed batch
    batch = collate(samples, rows, 0, row_len=pack.max_seq_len, target_offsets=targets.offsets)

    def loss() -> float:
        with torch.no_grad():  # no KV cache: with one, the row would not be split by position
            logits = model(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).logits
        return token_mean(per_token_loss(logits, batch, targets, cfg), batch.n_loss_tokens).item()

    before = loss()
    stats = train_round(
        model,
        make_optimizer(model, cfg),
        samples,
        targets,
        rows,
        cfg,
        pack,
        start_step=0,
        total_steps=8,
        seed=0,
        pad_id=0,
        bf16=False,
    )
    assert stats.steps == 8 and stats.log[0].loss == pytest.approx(before, rel=1e-5)
    after = loss()
    assert after < 0.5 * before, (before, after)
    assert stats.log[-1].loss < stats.log[0].loss


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_and_keeps_weights(bad):
    model = _model()
    samples, ids, m = _data()
    lp = torch.full((m, 4), -1.0)
    lp[0, 0] = bad
    targets = Targets(ids, lp, [0, 1, 3, 6, 7, 9])
    cfg, pack = TrainConfig(steps_per_round=3, rows_per_step=1), PackConfig(max_seq_len=16)
    kept, _, rows = packed_rows(samples, pack.max_seq_len, pack.overlong, pack.mode, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_round(
            model,
            make_optimizer(model, cfg),
            kept,
            targets,
            rows,
            cfg,
            pack,
            start_step=0,
            total_steps=3,
            seed=0,
            pad_id=0,
            bf16=False,
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lr_schedule_warmup_then_cosine_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(100, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55e-3)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """``train.gradient_checkpointing`` recomputes activations in backward: the same loss and
    gradients within 1e-5 on packed rows, with the position-id and per-sequence attention."""
    import copy

    from tiny_qwen import make_case, student

    from npd_core.method.train import checkpoint_activations, step_loss

    samples, targets = make_case([(3, 5), (6, 2), (2, 7), (4, 4)], seed=3)
    batch = collate(samples, [[0, 1], [2, 3]], pad_id=0, target_offsets=targets.offsets)
    for impl in ("sdpa", "sdpa_varlen"):
        plain = copy.deepcopy(student(impl)).train()
        ckpt = checkpoint_activations(copy.deepcopy(plain), True).train()
        assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
        losses = []
        for m in (plain, ckpt):
            loss = step_loss(m, batch, targets, TrainConfig(), bf16=False)
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)
        for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0, msg=name)
