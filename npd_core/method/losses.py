"""Distillation losses: pure functions of tensors, computed in float32.

Every loss takes the student's logits at the response positions only, shape (N, V), and returns
the per-token loss, shape (N,). The caller sums over tokens and divides by the number of
response tokens in the whole optimizer step (``token_mean``), so packed and padded batches are
normalized the same way; per sequence (``train.normalize: sequence``), each token first weighs
1 ÷ its sequence's length (``sequence_weights``) and the count is of sequences. Teacher targets
are the teacher's top-k log-probs per position, renormalized over the top-k: ``topk_ids``
(N, k) long, ``topk_logprobs`` (N, k) float.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def teacher_topk_probs(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Renormalize the teacher's top-k log-probs to a distribution over the k ids. (N, k)."""
    return torch.softmax(topk_logprobs.float(), dim=-1)


def forward_kl_topk(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    rest_mass: bool = False,
) -> torch.Tensor:
    """KL(p_T ‖ p_S) on the teacher's top-k support.

    ``loss_t = Σ_{i∈topk} p_T(i) (log p_T(i) − log p_S(i))`` with p_T renormalized over the top-k.
    With ``rest_mass=True`` the divergence of the k + 1 bins of :func:`tail_bucket` instead.

    Shapes: student_logits (N, V), topk_ids (N, k), topk_logprobs (N, k) → (N,).
    """
    if rest_mass:
        return divergence(*tail_bucket(student_logits, topk_ids, topk_logprobs), 0.0)
    logp_s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, topk_ids)  # (N, k)
    logp_t = torch.log_softmax(topk_logprobs.float(), dim=-1)  # (N, k)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1)


def reverse_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    rest_mass: bool = False,
) -> torch.Tensor:
    """Reverse KL(p_S ‖ p_T), full-support estimate under the *current* student.

    ``loss_t = Σ_i p_S(i) (log p_S(i) − log p̂_T(i))`` where p̂_T is the teacher's top-k,
    renormalized, with ids outside the top-k given the teacher's smallest top-k log-prob
    (a floor that keeps the estimate finite); exact when the top-k covers the vocabulary. With
    ``rest_mass=True`` the divergence of the k + 1 bins of :func:`tail_bucket` instead (no floor).
    The student weights are recomputed at train time, never taken from the generator's stale
    log-probs. Shapes: (N, V), (N, k), (N, k) → (N,).
    """
    return generalized_jsd(student_logits, topk_ids, topk_logprobs, 1.0, rest_mass)


def generalized_jsd(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    beta: float = 0.5,
    rest_mass: bool = False,
) -> torch.Tensor:
    """Generalized JSD(β) as in GKD (Agarwal et al. 2024), over the full vocabulary.

    ``M = β p_T + (1−β) p_S``; ``JSD_β = β KL(p_T ‖ M) + (1−β) KL(p_S ‖ M)``.
    The limits follow TRL's ``generalized_jsd_loss``: β = 0 is forward KL(p_T ‖ p_S), β = 1 is
    reverse KL(p_S ‖ p_T). Teacher outside its top-k as in ``reverse_kl`` (exact when the top-k
    covers the vocabulary), or, with ``rest_mass=True``, over the k + 1 bins of
    :func:`tail_bucket`. Shapes: (N, V), (N, k), (N, k) → (N,).
    """
    if rest_mass:
        return divergence(*tail_bucket(student_logits, topk_ids, topk_logprobs), beta)
    logp_s = F.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    logp_t = _teacher_full_logprobs(logp_s.shape[-1], topk_ids, topk_logprobs)  # (N, V)
    return divergence(logp_s, logp_t, beta)


def divergence(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(β) between two distributions given as log-probs over the last dim, β = 0 forward KL
    (p_T ‖ p_S), β = 1 reverse KL (p_S ‖ p_T). Shapes: (N, B), (N, B) → (N,)."""
    if beta == 0:
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if beta == 1:
        return (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    log_m = torch.logsumexp(
        torch.stack([logp_s + math.log(1 - beta), logp_t + math.log(beta)]), dim=0
    )
    kl_t = (logp_t.exp() * (logp_t - log_m)).sum(-1)
    kl_s = (logp_s.exp() * (logp_s - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def tail_bucket(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models on the k + 1 bins "each of the teacher's top-k ids, and the rest" (the
    ``train.rest_mass`` option): the teacher keeps its own top-k log-probs (not renormalized)
    and ``1 − Σ p_T`` goes to the rest; the student gets its log-probs at those ids and its mass
    outside them. A coarsening of the full vocabulary, so every divergence of the bins is at
    most the full one (equal when the top-k covers the vocabulary). Returns (log p_S, log p_T),
    (N, k + 1) each, float32."""
    logp_s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, topk_ids)  # (N, k)
    logp_t = topk_logprobs.float()  # (N, k)
    rest_s = (1 - logp_s.exp().sum(-1, keepdim=True)).clamp_min(1e-8).log()  # (N, 1)
    rest_t = (1 - logp_t.exp().sum(-1, keepdim=True)).clamp_min(1e-8).log()
    return torch.cat([logp_s, rest_s], -1), torch.cat([logp_t, rest_t], -1)


def sampled_reverse_kl(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprob: torch.Tensor,
    generator_logprob: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """Reverse KL estimated at the sampled tokens only, as on-policy distillation does (Thinking
    Machines, tinker-cookbook): per token the advantage ``A_t = log p_T(y_t) − log p_S(y_t)``
    (no gradient through it) weighted by the truncated importance ratio
    ``w_t = min(p_S(y_t) / p_gen(y_t), clip)`` (samples come from an older checkpoint).

    The value is ``−w_t A_t`` (the importance-weighted one-sample reverse-KL estimate) and the
    gradient ``−w_t A_t ∇ log p_S(y_t)`` (REINFORCE with the advantage as reward). Tokens with no
    generator (``generator_logprob`` NaN: mixed-in teacher or reference sequences) carry no loss.

    Shapes: student_logits (N, V), labels (N,) long, teacher_logprob (N,), generator_logprob
    (N,) → (N,) float32.
    """
    logp_s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    gen = generator_logprob.float()
    sampled = ~torch.isnan(gen)
    ratio = torch.exp(logp_s.detach() - torch.where(sampled, gen, logp_s.detach()))
    w = torch.where(sampled, ratio.clamp(max=clip), torch.zeros_like(ratio))  # (N,)
    adv = teacher_logprob.float() - logp_s.detach()  # (N,)
    return -w * adv * (1 + logp_s - logp_s.detach())  # value −wA, gradient −wA ∇log p_S


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on given token ids (teacher argmax, or the sampled tokens for the sft mix).

    Shapes: (N, V), (N,) → (N,).
    """
    return F.cross_entropy(student_logits.float(), labels, reduction="none")


def _teacher_full_logprobs(
    vocab: int, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Spread the renormalized top-k over the vocabulary with a floor outside it. (N, V)."""
    logp_k = torch.log_softmax(topk_logprobs.float(), dim=-1)  # (N, k)
    floor = logp_k.min(-1, keepdim=True).values - math.log(max(vocab, 2))
    full = floor.expand(-1, vocab).clone()
    full.scatter_(-1, topk_ids, logp_k)
    return torch.log_softmax(full, dim=-1)


def sequence_weights(seq: torch.Tensor) -> torch.Tensor:
    """``train.normalize: sequence`` (GKD's 1/L_y): each response position weighs 1 ÷ the
    response tokens of its sequence, so every sequence counts once however long it is; divided
    by the step's sequences (``token_mean``'s count), the step's loss is the mean over sequences
    of each one's token mean. seq (M,) long, any sequence id per position → (M,) float32."""
    _, inverse, counts = torch.unique(seq, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].float()


def token_mean(per_token: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
    """Sum of per-token losses ÷ response tokens of the whole step; 0 for an empty step."""
    n = torch.as_tensor(n_tokens, dtype=torch.float32).clamp_min(1)
    return per_token.sum() / n
