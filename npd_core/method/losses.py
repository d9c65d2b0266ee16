"""Distillation losses: pure functions of tensors, computed in float32.

Every loss takes the student's logits at the response positions only, shape (N, V), and returns
the per-token loss, shape (N,). The caller sums over tokens and divides by the number of
response tokens in the whole optimizer step (``token_mean``), so packed and padded batches are
normalized the same way. Teacher targets are the teacher's top-k log-probs per position,
renormalized over the top-k: ``topk_ids`` (N, k) long, ``topk_logprobs`` (N, k) float.
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
    With ``rest_mass=True`` the teacher keeps its own top-k probabilities and the remaining mass
    ``1 − Σ p_T`` is matched against the student's mass outside the top-k (one extra "rest" bin).

    Shapes: student_logits (N, V), topk_ids (N, k), topk_logprobs (N, k) → (N,).
    """
    logp_s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, topk_ids)  # (N, k)
    if not rest_mass:
        logp_t = torch.log_softmax(topk_logprobs.float(), dim=-1)  # (N, k)
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    logp_t = topk_logprobs.float()
    p_t = logp_t.exp()
    rest_t = (1 - p_t.sum(-1)).clamp_min(1e-8)  # (N,)
    rest_s = (1 - logp_s.exp().sum(-1)).clamp_min(1e-8)
    return (p_t * (logp_t - logp_s)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())


def reverse_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Reverse KL(p_S ‖ p_T), full-support estimate under the *current* student.

    ``loss_t = Σ_i p_S(i) (log p_S(i) − log p̂_T(i))`` where p̂_T is the teacher's top-k,
    renormalized, with ids outside the top-k given the teacher's smallest top-k log-prob
    (a floor that keeps the estimate finite). The student weights are recomputed at train time,
    never taken from the generator's stale log-probs. Shapes: (N, V), (N, k), (N, k) → (N,).
    """
    logp_s = F.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    logp_t = _teacher_full_logprobs(logp_s.shape[-1], topk_ids, topk_logprobs)  # (N, V)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized JSD(β) as in GKD (Agarwal et al. 2024), over the full vocabulary.

    ``M = β p_T + (1−β) p_S``; ``JSD_β = β KL(p_T ‖ M) + (1−β) KL(p_S ‖ M)``.
    The limits follow TRL's ``generalized_jsd_loss``: β = 0 is forward KL(p_T ‖ p_S), β = 1 is
    reverse KL(p_S ‖ p_T). Teacher outside its top-k as in ``reverse_kl``.
    Shapes: (N, V), (N, k), (N, k) → (N,).
    """
    logp_s = F.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    logp_t = _teacher_full_logprobs(logp_s.shape[-1], topk_ids, topk_logprobs)  # (N, V)
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


def token_mean(per_token: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
    """Sum of per-token losses ÷ response tokens of the whole step; 0 for an empty step."""
    n = torch.as_tensor(n_tokens, dtype=torch.float32).clamp_min(1)
    return per_token.sum() / n
