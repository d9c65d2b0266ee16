"""TRL's own on-policy distillation (``trl.DistillationTrainer``, TRL 1.16) on our world.

Why: users know TRL, so ``npd bench --peers trl`` runs its trainer on the same teacher, the same
warm-start student, the same training prompts and the same held-out evaluation as our variants,
and reports it as one more curve. TRL's defaults suit large LLMs (bf16, gradient checkpointing,
lr 1e-6, β = 1 = reverse KL, 512 completion tokens); ``trl_args`` sets every one of them from our
config instead, so the comparison is of implementations, not of settings:

- loss: TRL 1.16's ``DistillationTrainer`` computes generalized JSD(β) over the *full*
  vocabulary, per token, always on the student's own samples (λ = 1; ``lmbda`` and
  ``loss_top_k`` exist only in ``trl.experimental``); :func:`effective_loss` states exactly that
  in the bench JSON. Our ``forward_kl`` on the teacher's top-k maps to β = 0, the closest it
  offers (identical when k ≥ the vocabulary; the toy world's 318 tokens are more than k = 16,
  where ours matches the renormalized top-16 and TRL the full distribution), ``reverse_kl`` to
  β = 1, ``jsd`` to our β (same convention); ``ce``, ``sampled_reverse_kl`` and per-sequence
  normalisation have no TRL twin.
- precision: ``bf16`` as ``models.bf16``. TRL 1.16 samples under accelerate's bf16 autocast, but
  its loss calls the backbones directly, past the autocast wrapper, so on fp32 weights the
  teacher and student forwards of its train step run in fp32 whatever ``bf16`` says.
- schedule: TRL's AdamW with our β₂ = 0.95, weight decay and grad clip; the learning rate of
  every step is ours (``npd_core.method.optim.lr_at``: linear warmup, cosine to
  ``min_lr_ratio × lr``), since neither of HF's cosine-with-floor schedules lands on the same
  steps. Its horizon is ``max_steps`` when given, else fixed as ``onpolicy`` fixes it
  (``npd_core.baselines.budget``): after the calibration steps, the steps that fit the budget at
  the speed measured so far.
- sampling: ``max_new_tokens``, ``temperature`` (TRL also divides the loss logits by it; ours is
  1.0, where that is a no-op), ``top_p``, no top-k; one completion per prompt, one update per
  generation batch (λ = 1, fully on-policy); bf16 as ``models.bf16``; no gradient checkpointing.
- prompts: plain text through the tokenizer (no chat template unless it has one and
  ``data.chat_template`` is ``auto``: then TRL applies it, as ``format_prompts`` does); the
  completion ends at EOS, which carries loss, as in ours.

The clock runs only while TRL trains: a callback pauses it, scores the held-out set with our
greedy exact match at each wall-clock checkpoint, and stops training at the budget.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import trl
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DistillationConfig, DistillationTrainer

from npd_core.baselines.budget import CALIBRATION_STEPS, NO_HORIZON
from npd_core.config import NPDConfig, TrainConfig
from npd_core.data import Prompt
from npd_core.errors import ConfigError
from npd_core.method.evaluate import exact_match, greedy_decoded
from npd_core.method.optim import lr_at
from npd_core.models import format_prompts, load_model, load_tokenizer, templated, use_bf16

LOSS_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}  # TRL's β for our loss names ("jsd": our β)


@dataclass
class PeerResult:
    """One peer run: held-out curve on the training clock, token counts, the settings used."""

    curve: list[dict[str, float]]  # [{"wall_s", "score"}], wall_s excludes evaluation
    wall_s: float  # training clock at the end
    steps: int
    generated_tokens: int  # completion tokens sampled (EOS included)
    train_tokens: int  # prompt + completion tokens through the training forward
    stage_seconds: dict[str, float]  # generate, train (teacher forward + update), evaluate
    settings: dict[str, Any] = field(default_factory=dict)  # every DistillationConfig field set

    @property
    def final_score(self) -> float:
        return self.curve[-1]["score"]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "final_score": self.final_score}


def trl_args(
    cfg: NPDConfig, *, prompts_per_step: int, max_steps: int | None, output_dir: str
) -> tuple[DistillationConfig, dict[str, Any]]:
    """TRL's config matching our on-policy settings; also returns the fields we set.
    ``max_steps=None``: no step cap (the clock stops training), horizon calibrated."""
    t, g = cfg.train, cfg.generate
    if t.loss not in ("forward_kl", "reverse_kl", "jsd"):
        raise ConfigError(
            f"train.loss: {t.loss!r} has no DistillationTrainer equivalent; use forward_kl, "
            "reverse_kl or jsd with --peers trl"
        )
    if t.normalize != "token":
        raise ConfigError(
            "train.normalize: TRL's DistillationTrainer averages over tokens only; set it to "
            "token with --peers trl"
        )
    if t.sft_weight:
        raise ConfigError("train.sft_weight: TRL's DistillationTrainer has no sft mix; set it to 0")
    if g.temperature == 0:
        raise ConfigError("generate.temperature: on-policy sampling needs a temperature > 0")
    settings: dict[str, Any] = dict(
        beta=LOSS_BETA.get(t.loss, t.beta),
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_steps=max_steps or NO_HORIZON,
        per_device_train_batch_size=prompts_per_step,
        gradient_accumulation_steps=1,
        max_completion_length=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=0,
        bf16=use_bf16(cfg.models.bf16),
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        push_to_hub=False,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args = DistillationConfig(output_dir=output_dir, **settings)
    schedule = dict(
        lr_scheduler="npd_core.method.optim.lr_at",
        warmup_steps=t.warmup_steps,
        min_lr_ratio=t.min_lr_ratio,
        lr_horizon="max_steps" if max_steps else "calibrated as onpolicy's",
    )
    return args, {**settings, **schedule, "effective": effective_loss(cfg)}


def effective_loss(cfg: NPDConfig) -> dict[str, Any]:
    """What TRL 1.16's DistillationTrainer optimises under our config, stated for readers of the
    bench JSON beside ours: JSD(β) over the full vocabulary per completion token, on λ = 1 (every
    sequence the current student's own sample; no teacher or reference mix), against our loss on
    the teacher's stored top-k of near-policy samples."""
    t = cfg.train
    return {
        "loss": "generalized_jsd",  # β = 0 forward KL, β = 1 reverse KL
        "beta": LOSS_BETA.get(t.loss, t.beta),
        "lmbda": 1.0,  # fraction of on-policy (student-sampled) sequences
        "vocabulary_coverage": "full",
        "normalize": "token",
        "ours": {
            "loss": t.loss,
            "beta": t.beta if t.loss == "jsd" else LOSS_BETA.get(t.loss),
            "lmbda": 1.0 - cfg.data.mix.fraction,
            "vocabulary_coverage": f"teacher top-{cfg.score.top_k}"
            + (" + rest bucket" if t.rest_mass else ""),
            "normalize": t.normalize,
        },
    }


@dataclass
class _Schedule:
    """Our lr schedule for TRL's LambdaLR; the horizon is fixed once, as ``onpolicy`` fixes it."""

    cfg: TrainConfig
    horizon: int | None = None

    def factor(self, step: int) -> float:
        return lr_at(step, self.cfg, self.horizon or NO_HORIZON) / self.cfg.lr


class _Clock(TrainerCallback):
    """Training wall clock that stops while evaluating; evaluates at checkpoints, stops at the
    budget, fixes the lr horizon after the calibration steps."""

    def __init__(
        self,
        budget_s: float,
        eval_at: list[float],
        evaluate: Callable[[], float],
        schedule: _Schedule,
    ) -> None:
        self.budget_s, self.eval_at, self.evaluate = budget_s, sorted(eval_at), evaluate
        self.schedule = schedule
        self.curve: list[dict[str, float]] = []
        self.train_s = 0.0  # clock at the last pause
        self.eval_s = 0.0
        self._resumed = 0.0

    def elapsed(self) -> float:
        return self.train_s + time.perf_counter() - self._resumed

    def _point(self) -> None:
        self.train_s = self.elapsed()
        t0 = time.perf_counter()
        self.curve.append({"wall_s": round(self.train_s, 3), "score": self.evaluate()})
        self.eval_s += time.perf_counter() - t0
        self._resumed = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self._resumed = time.perf_counter()
        self._point()  # the warm start, at 0 s

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        now, step = self.elapsed(), state.global_step
        sched = self.schedule
        if sched.horizon is None and step >= max(sched.cfg.warmup_steps, CALIBRATION_STEPS):
            sched.horizon = step + max(0, round((self.budget_s - now) / (now / step)))
            for g, base in zip(optimizer.param_groups, lr_scheduler.base_lrs, strict=True):
                g["lr"] = base * sched.factor(step)  # the next step's lr, under the horizon
        if now >= self.budget_s:
            control.should_training_stop = True
            return
        if self.eval_at and now >= self.eval_at[0]:
            self.eval_at = [t for t in self.eval_at if t > now]
            self._point()

    def on_train_end(self, args, state, control, **kw):
        self._point()  # the final score, at the end of the clock


class _Trainer(DistillationTrainer):
    """TRL's trainer with our learning-rate schedule; counts the completion tokens it samples and
    the time it spends sampling them."""

    def __init__(self, *args: Any, schedule: _Schedule, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.schedule = schedule
        self.generated_tokens = 0
        self.generate_s = 0.0
        self.remove_callback(PrinterCallback)  # it prints the logs on stdout (--json owns stdout)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.schedule.factor)
        return self.lr_scheduler

    def _generate(self, prompts: list):
        t0 = time.perf_counter()
        out = super()._generate(prompts)
        self.generate_s += time.perf_counter() - t0
        self.generated_tokens += sum(len(c) for c in out[1])  # out[1]: completion ids
        return out


def heldout_score(model: PreTrainedModel, tok: Any, prompts: list[Prompt], cfg: NPDConfig) -> float:
    """Greedy exact match in points on ``prompts`` (as the evaluate stage scores a checkpoint)."""
    ids = format_prompts(tok, [p.prompt for p in prompts], cfg.data.chat_template)
    was_training = model.training
    _, texts = greedy_decoded(model, tok, ids, cfg)
    model.train(was_training)
    answers = [p.answer for p in prompts]
    return exact_match(texts, answers, cfg.eval.metric, cfg.eval.answer_regex).score


def run_trl(
    cfg: NPDConfig,
    *,
    teacher: str,
    student: str,
    train_prompts: list[Prompt],
    eval_prompts: list[Prompt],
    prompts_per_step: int,
    max_steps: int | None,
    budget_s: float,
    eval_at: list[float],
    log: Callable[[str], None] = lambda m: None,
) -> PeerResult:
    """Train ``student`` towards ``teacher`` with TRL for ``budget_s`` training seconds (or
    ``max_steps``, then also the schedule's horizon), scoring ``eval_prompts`` (the first
    ``data.eval_size``) at the ``eval_at`` clock times, at 0 and at the end."""
    if any(p.answer is None for p in eval_prompts):
        raise ConfigError(
            "data.eval_prompts: --peers trl scores exact match; every held-out "
            "prompt needs an 'answer'"
        )
    torch.set_num_threads(cfg.stage_threads(concurrent=False))  # as onpolicy: all cores
    eval_prompts = eval_prompts[: cfg.data.eval_size] if cfg.data.eval_size else eval_prompts
    tok = load_tokenizer(student)
    tok.padding_side = "left"
    model, teacher_model = load_model(student), load_model(teacher)
    rows: list[Any] = [p.prompt for p in train_prompts]
    if templated(tok, cfg.data.chat_template):  # TRL applies the template to turns
        rows = [[{"role": "user", "content": x}] if isinstance(x, str) else list(x) for x in rows]
    schedule = _Schedule(cfg.train, max_steps)
    score = partial(heldout_score, model, tok, eval_prompts, cfg)
    clock = _Clock(budget_s, eval_at, score, schedule)
    with tempfile.TemporaryDirectory(prefix="npd-trl-") as out:
        args, settings = trl_args(
            cfg, prompts_per_step=prompts_per_step, max_steps=max_steps, output_dir=out
        )
        trainer = _Trainer(
            model=model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": rows}),
            processing_class=tok,
            callbacks=[clock],
            schedule=schedule,
        )
        log(
            f"trl {trl.__version__}: DistillationTrainer β={args.beta}, lr {args.learning_rate}, "
            f"{prompts_per_step} prompts/step, {budget_s:.0f} s budget"
        )
        trainer.train()
    wall = clock.curve[-1]["wall_s"]
    return PeerResult(
        curve=clock.curve,
        wall_s=wall,
        steps=trainer.state.global_step,
        generated_tokens=trainer.generated_tokens,
        train_tokens=int(trainer.state.num_input_tokens_seen),
        stage_seconds={
            "generate": round(trainer.generate_s, 3),
            "train": round(wall - trainer.generate_s, 3),
            "evaluate": round(clock.eval_s, 3),
        },
        settings={
            "trl_version": trl.__version__,
            "trainer": "DistillationTrainer",
            **settings,
            "optimizer_steps": trainer.state.global_step,
            "lr_horizon_steps": schedule.horizon,
        },
    )
