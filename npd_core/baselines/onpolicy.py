"""The ``onpolicy`` baseline: synchronous on-policy distillation, TRL's GKD with λ = 1.

Every optimizer step samples a mini-batch of prompts, lets the **current** student answer them
(our batched KV-cache sampler, the one NPD's generate stage uses), has the teacher score the
answers (one forward, top-k log-probs at every response position, nothing recomputed), and takes
one gradient step on a padded batch with NPD's own per-token loss (``train.loss``: forward KL on
the teacher's top-k by default, reverse KL or JSD(β) as configured) and NPD's own optimizer step
and learning-rate schedule. bf16 autocast and threads as NPD's stages. What it does not have is
what NPD adds: no round of samples made ahead, no packing, no overlap of generation with training.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from transformers import PreTrainedModel

from npd_core.baselines.budget import batch_indices, resume, save
from npd_core.data import read_prompts
from npd_core.method.generate import apply_stop_strings, generate
from npd_core.method.packing import IGNORE_INDEX, PackedBatch, Sample, collate, response_offsets
from npd_core.method.score import response_scores
from npd_core.method.train import Targets, micro_batches, optimizer_step
from npd_core.models import format_prompts, frozen_dtype, load_model, use_bf16
from npd_core.pipeline.spec import RunSpec, StageResult
from npd_core.seeds import seed_for


def teacher_topk(
    teacher: PreTrainedModel, batch: PackedBatch, offsets: list[int], top_k: int, bf16: bool
) -> Targets:
    """The teacher's top-k log-probs and its log-prob of the response token at every response
    position of ``batch``, one forward and the LM head chunk by chunk
    (``method.score.response_scores``).

    ``batch`` comes from ``collate(..., target_offsets=offsets)``; the table is indexed by its
    ``target_index``, so the student's loss reads the teacher at the same positions.
    Returns targets of shape (M, k) and (M,), M = response tokens in the batch.
    """
    sc = response_scores(teacher, batch, top_k=top_k, bf16=bf16)
    values, ids, tok_lp = sc.topk_logprobs.cpu(), sc.topk_ids.cpu(), sc.token_logprob.cpu()
    index = batch.target_index[batch.labels != IGNORE_INDEX]  # (M,) row of each position
    table_ids, table_lp, table_tok = (torch.empty_like(x) for x in (ids, values, tok_lp))
    table_ids[index], table_lp[index], table_tok[index] = ids, values, tok_lp
    return Targets(table_ids, table_lp, offsets, teacher_token=table_tok)


def onpolicy_segment(
    spec: RunSpec,
    k: int,
    until_s: float,
    budget_s: float,
    prompts_per_step: int,
) -> StageResult:
    """θ_{k−1} → θ_k: on-policy steps until the training clock reaches ``until_s``."""
    cfg = spec.cfg
    tc, g = cfg.train.step_spec(), cfg.generate
    torch.set_num_threads(cfg.stage_threads(concurrent=False))  # one stage at a time: all cores
    t_start, p_start = time.time(), time.perf_counter()
    teacher = load_model(spec.teacher, frozen_dtype(spec.cfg.models.frozen_dtype))
    lrn = resume(spec, k)
    tok = lrn.tok
    train = read_prompts(spec.train_prompts)
    prompts = format_prompts(tok, [p.prompt for p in train], cfg.data.chat_template)

    def text(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    lrn.start()
    # One sequence per row: plain SDPA over the padded batch (the per-sequence varlen attention
    # NPD uses for packed rows would make two segments of every row here, and is slower).
    while lrn.elapsed() < until_s:
        t0 = time.perf_counter()
        lr = lrn.lr(tc)  # 1. learning rate of this step
        idx = batch_indices(len(prompts), prompts_per_step, lrn.step, cfg.seed)
        gens = generate(  # 2. the current student answers the mini-batch
            lrn.model,
            [prompts[i] for i in idx],
            n_per_prompt=g.n_per_prompt,
            max_new_tokens=g.max_new_tokens,
            eos_ids={tok.eos_token_id},
            pad_id=tok.pad_token_id,
            temperature=g.temperature,
            top_p=g.top_p,
            seeds=[
                [
                    seed_for(cfg.seed, "onpolicy", lrn.step, train[i].id, k)
                    for k in range(g.n_per_prompt)
                ]
                for i in idx
            ],
            batch_size=g.batch_size,
            bf16=use_bf16(cfg.models.bf16),
        )
        answers = [
            (prompts[i], cut)
            for i, outs in zip(idx, gens, strict=True)
            for x in outs
            if (cut := apply_stop_strings(x, text, cfg.data.stop)[0]).token_ids
        ]
        samples = [Sample(p, cut.token_ids) for p, cut in answers]
        t1 = time.perf_counter()  # 3. the teacher scores them
        offsets = response_offsets(samples)
        rows = [[i] for i in range(len(samples))]  # one sample per row, padded to the longest
        batch = collate(samples, rows, tok.pad_token_id, target_offsets=offsets)
        targets = teacher_topk(teacher, batch, offsets, cfg.score.top_k, use_bf16(cfg.models.bf16))
        sampled = torch.tensor([lp for _, cut in answers for lp in cut.logprobs])  # (M,)
        targets = replace(targets, generator_token=sampled)  # sampled_reverse_kl's ratio ≈ 1
        t2 = time.perf_counter()
        lrn.model.train()  # 4. one step on NPD's per-token loss, micro_rows rows a forward
        micro = micro_batches(
            samples, rows, tok.pad_token_id, tc.forwards(len(rows)), target_offsets=offsets
        )
        loss = optimizer_step(
            lrn.model,
            lrn.optimizer,
            micro,
            targets,
            tc,
            lr=lr,
            step=lrn.step,
            bf16=use_bf16(cfg.models.bf16),
        )
        t3 = time.perf_counter()
        lrn.add(
            generate_s=t1 - t0,
            score_s=t2 - t1,
            train_s=t3 - t2,
            generated_tokens=sum(len(s.response_ids) for s in samples),
            train_tokens=batch.n_real_tokens,
            teacher_tokens=batch.n_real_tokens,  # one teacher forward over the same batch
        )
        lrn.stepped(loss.item(), lr, batch.n_real_tokens, t3 - t0, budget_s, tc.warmup_steps)
    return save(spec, k, lrn, time.perf_counter() - p_start, t_start)
