"""Instruction-following difficulty (Li et al. 2024, "Cherry LLM") and Δ-IFD.

``IFD_M(y|x) = PPL_M(y|x) / PPL_M(y)``, both perplexities over the same response tokens (EOS
included). In log space:
``log IFD = mean NLL(y|x) − mean NLL(y) = (Σ log p(y) − Σ log p(y|x)) / n``.
Δ-IFD of a student sample is ``log IFD_teacher − log IFD_student``: large positive means the
teacher finds the student's answer far less natural than the student does (off-track, OOD);
strongly negative means nothing is left to learn.
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


def delta_ifd(log_ifd_teacher: np.ndarray, log_ifd_student: np.ndarray) -> np.ndarray:
    """Δ-IFD = log IFD_teacher − log IFD_student. (N,)."""
    return np.asarray(log_ifd_teacher) - np.asarray(log_ifd_student)
