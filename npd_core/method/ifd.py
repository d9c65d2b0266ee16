"""Instruction-following difficulty (Li et al. 2024, "Cherry LLM") and Δ-IFD.

``IFD_M(y|x) = PPL_M(y|x) / PPL_M(y)``, both perplexities over the same response tokens (EOS
included). In log space:
``log IFD = mean NLL(y|x) − mean NLL(y) = (Σ log p(y) − Σ log p(y|x)) / n``.
Δ-IFD of a student sample is ``log IFD_teacher − log IFD_student``: large positive means the
teacher finds the student's answer far less natural than the student does (off-track, OOD);
strongly negative means nothing is left to learn.

Cherry-LLM's own code ranks by the ratio of the mean losses instead, ``IFD = mean NLL(y|x) ÷
mean NLL(y)`` (``filter.ifd_form: ratio``), and Δ-IFD is then ``IFD_teacher − IFD_student``. The
two forms rank samples differently, most where the losses are small. The other scores a filter
rule can read (``filter.score``) come from the conditional sums alone: ``conditional`` =
``mean NLL_teacher(y|x) − mean NLL_generator(y|x)`` (on the generator's own samples its mean is
the per-token reverse KL(generator ‖ teacher)) and ``teacher_nll`` = ``mean NLL_teacher(y|x)``;
``learner_ratio`` is the mean per-token ``log p_learner − log p_generator`` of a sample, known
only inside the training forward.
"""

from __future__ import annotations

import numpy as np


def log_ifd(
    cond_logprob_sum: np.ndarray, resp_logprob_sum: np.ndarray, n_tokens: np.ndarray
) -> np.ndarray:
    """log IFD per sample from log-likelihood sums with and without the prompt.

    Shapes: (N,), (N,), (N,) → (N,). ``n_tokens == 0`` gives NaN (an empty response has no IFD).
    """
    n = np.asarray(n_tokens, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (
            np.asarray(resp_logprob_sum, np.float64) - np.asarray(cond_logprob_sum, np.float64)
        ) / n


def ratio_ifd(
    cond_logprob_sum: np.ndarray, resp_logprob_sum: np.ndarray, n_tokens: np.ndarray
) -> np.ndarray:
    """Cherry-LLM's IFD, ``mean NLL(y|x) ÷ mean NLL(y)`` (the token counts cancel; they only
    make an empty response NaN). Shapes: (N,), (N,), (N,) → (N,)."""
    n = np.asarray(n_tokens, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = np.asarray(cond_logprob_sum, np.float64) / n
        return cond / (np.asarray(resp_logprob_sum, np.float64) / n)


def delta_ifd(ifd_teacher: np.ndarray, ifd_student: np.ndarray) -> np.ndarray:
    """Δ-IFD = IFD_teacher − IFD_student, of either form (log IFD or the ratio). (N,)."""
    return np.asarray(ifd_teacher) - np.asarray(ifd_student)


def conditional(
    teacher_cond_sum: np.ndarray, generator_cond_sum: np.ndarray, n_tokens: np.ndarray
) -> np.ndarray:
    """``mean NLL_teacher(y|x) − mean NLL_generator(y|x)``, the conditional term of log Δ-IFD
    (no prompt-less view needed). Shapes: (N,) each → (N,); NaN for an empty response."""
    n = np.asarray(n_tokens, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.asarray(generator_cond_sum, np.float64) - np.asarray(teacher_cond_sum, np.float64)
        return diff / n


def teacher_nll(teacher_cond_sum: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """The teacher's mean NLL of each response given its prompt. (N,), (N,) → (N,)."""
    n = np.asarray(n_tokens, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return -np.asarray(teacher_cond_sum, np.float64) / n
