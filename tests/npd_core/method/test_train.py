"""The learner: a round lowers the loss on the rows it trains on; a non-finite loss stops the
round with a clear error and leaves weights alone; the lr schedule; gradient accumulation
(``train.micro_rows``) gives the one-forward step, and by default is that step bitwise."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from npd_core.config import PackConfig, TrainConfig
from npd_core.errors import TrainingError
from npd_core.method.losses import token_mean
from npd_core.method.optim import lr_at, make_optimizer
from npd_core.method.packing import Sample, collate, packed_rows
from npd_core.method.train import (
    Targets,
    accumulate,
    forward_losses,
    micro_batches,
    optimizer_step,
    per_token_loss,
    step_loss,
    train_round,
)
from npd_core.train_spec import StepSpec


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
        cfg.step_spec(),
        pack.max_seq_len,
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
            cfg.step_spec(),
            pack.max_seq_len,
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

    from npd_core.method.optim import checkpoint_activations

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


def _accumulation_case():
    """Five rows of packed samples of uneven lengths (11 samples), their targets, and the tiny
    float32 Qwen2 of the method tests."""
    from tiny_qwen import make_case, qwen2

    pr = [(3, 5), (6, 2), (2, 7), (4, 4), (5, 1), (2, 3), (3, 6), (7, 2), (2, 2), (4, 5), (3, 3)]
    samples, targets = make_case(pr, seed=5)
    rows = [[0, 1], [2, 3, 4], [5], [6, 7], [8, 9, 10]]
    return qwen2(), samples, targets, rows


@pytest.mark.parametrize("row_len", [32, None], ids=["packed", "padded_per_micro_batch"])
def test_accumulated_gradients_equal_the_one_forward_step(row_len):
    """The step's 5 rows in 1, 2, 3 or 5 forwards (``micro_rows`` 5, 3, 2, 1): the same loss
    and gradients within 1e-6 (fp32), the loss normalised by the whole step's 40 response
    tokens; also with each micro-batch padded to its own longest row (the on-policy batch)."""
    model, samples, targets, rows = _accumulation_case()
    model.train()
    grads, step_losses = [], []
    for micro_rows in (5, 3, 2, 1):
        forwards = StepSpec(micro_rows=micro_rows).forwards(len(rows))
        micro = micro_batches(samples, rows, 0, forwards, row_len, targets.offsets)
        assert len(micro) == forwards and max(len(b.input_ids) for b in micro) <= micro_rows
        n = sum(b.n_loss_tokens for b in micro)
        assert n == 40

        def forward(b):
            return forward_losses(model, b, targets, StepSpec(), bf16=False)

        step_losses.append(accumulate(forward, micro, n).item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert step_losses == pytest.approx([step_losses[0]] * 4, abs=1e-6)
    for got in grads[1:]:
        for a, b in zip(grads[0], got, strict=True):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def _round(base, samples, targets, rows, spec: StepSpec) -> dict[str, torch.Tensor]:
    """The weights after ``train_round`` with ``spec`` on a copy of ``base``."""
    import copy

    model = copy.deepcopy(base)
    train_round(
        model, make_optimizer(model, spec), samples, targets, rows, spec, 32,
        start_step=0, total_steps=spec.steps_per_round, seed=0, pad_id=0, bf16=False,
    )  # fmt: skip
    return dict(model.named_parameters())


def test_micro_rows_train_the_one_forward_round_and_none_is_that_step_bitwise():
    """Three steps of ``train_round``, 5 rows a step: ``micro_rows`` 2 (3 forwards a step) gives
    the weights of one forward a step within 5e-5, a two-hundredth of lr (AdamW's first steps
    move every weight by about lr, whatever the size of its gradient, so rounding in a small
    gradient, such as a key bias's 2e-4, shows: 1e-5 to 1.2e-5 on one CPU, 2e-6 on another;
    the gradients themselves agree within 1e-6, above). ``micro_rows`` none (the default) is
    bitwise the plain step written out: forward all rows, mean over their response tokens,
    backward, clip, AdamW."""
    import copy

    base, samples, targets, rows = _accumulation_case()
    spec = StepSpec(lr=1e-2, warmup_steps=0, steps_per_round=3, rows_per_step=5)
    one = _round(base, samples, targets, rows, spec)
    accumulated = _round(base, samples, targets, rows, StepSpec(**{**vars(spec), "micro_rows": 2}))
    for name, w in one.items():
        torch.testing.assert_close(accumulated[name], w, atol=5e-5, rtol=0, msg=name)

    spec = StepSpec(**{**vars(spec), "steps_per_round": 1})
    got = _round(base, samples, targets, rows, spec)
    plain = copy.deepcopy(base).train()
    opt = make_optimizer(plain, spec)
    for g in opt.param_groups:
        g["lr"] = lr_at(0, spec, 1)
    batch = collate(samples, rows, 0, row_len=32, target_offsets=targets.offsets)
    step_loss(plain, batch, targets, spec, bf16=False).backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), spec.grad_clip)
    opt.step()
    for name, w in plain.named_parameters():
        assert torch.equal(got[name], w), name


def test_optimizer_step_takes_a_batch_or_its_micro_batches():
    """``optimizer_step`` on one batch and on its rows as micro-batches: the same step loss."""
    import copy

    base, samples, targets, rows = _accumulation_case()
    losses = []
    for forwards in (1, 5):
        model = copy.deepcopy(base).train()
        micro = micro_batches(samples, rows, 0, forwards, 32, targets.offsets)
        batch = micro[0] if forwards == 1 else micro
        losses.append(
            optimizer_step(
                model, make_optimizer(model, StepSpec()), batch, targets, StepSpec(),
                lr=1e-3, step=0, bf16=False,
            ).item()
        )  # fmt: skip
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_the_config_makes_the_step_spec_and_checks_micro_rows_per_rank():
    """``TrainConfig.step_spec()`` carries the config's values (its defaults are the spec's);
    on 2 processes, 5 rows a step and 1 row a forward would give one process 3 forwards and
    the other 2 rows: refused in one line naming the field and the fix."""
    assert TrainConfig().step_spec() == StepSpec()
    assert TrainConfig(micro_rows=4, lr=1e-4).step_spec() == StepSpec(micro_rows=4, lr=1e-4)
    assert StepSpec(micro_rows=4).forwards(16) == 4 and StepSpec().forwards(16) == 1
    TrainConfig(rows_per_step=5, nproc=2, micro_rows=2)  # 3 rows: 2 forwards; 2 rows: 2
    with pytest.raises(ValueError, match=r"train.micro_rows \(1\).*2 rows for 3 forwards"):
        TrainConfig(rows_per_step=5, nproc=2, micro_rows=1)
