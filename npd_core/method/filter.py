"""The filter: well-formedness checks, then one rule on one score; every dropped sample keeps a
reason.

Checks, in order (the first that applies is the reason): ``empty`` (no response token),
``unfinished`` (no EOS, only with ``drop_unfinished``), ``non_finite`` (a score that is NaN/inf:
the teacher's log-likelihood, or the rule's score when computed). The samples left are "in
play"; the rule turns their scores into bounds ``[low, high]`` and drops ``below_band`` /
``above_band``.

Scores (``filter.score``, see :mod:`npd_core.method.ifd`), and the tail that marks a bad sample:

- ``delta_ifd`` (``filter.ifd_form``: log IFD or Cherry-LLM's ratio): the high tail (the teacher
  finds the sample far less natural than its generator does); the low tail has nothing to teach;
- ``conditional``, L_c^T − L_c^S: the high tail, as for Δ-IFD, without the prompt-less views;
- ``teacher_nll``: the high tail (the teacher finds the response unlikely);
- ``learner_ratio``, the mean per-token log p_learner − log p_generator: both tails (far from 0,
  the learner has drifted from the generator: a stale sample), applied inside the train step
  (:func:`step_weights`), not here; rows from a fixed source have no generator and are exempt.

Rules (``filter.rule``), each a pure function of the in-play scores:

- ``band``: the ``[q_low, q_high]`` quantiles (or the absolute bounds when given);
- ``upper`` / ``lower``: one tail of the band (the other side open);
- ``fence``: median ± k·MAD (MAD scaled by 1.4826, so k is in standard deviations for Gaussian
  data), each side on or off; drops nothing when nothing is extreme, nor when MAD is 0;
- ``none``: keeps every in-play sample (no score need be computed at all);
- ``random``: keeps ``round(keep × in play)`` of them uniformly at random, drawn from (run seed,
  round) (:func:`random_keep`), the share per round from ``keep`` / ``keep_by_round``: the control
  a score's rule is matched against (reads no score).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from npd_core.method.ifd import conditional, delta_ifd, ratio_ifd, teacher_nll
from npd_core.seeds import seed_for

if TYPE_CHECKING:  # read by attribute: the method runs without pydantic
    from npd_core.config import FilterConfig

MAD_SCALE = 1.4826  # MAD × this estimates σ for Gaussian data
Bounds = tuple[float, float]


@dataclass
class FilterResult:
    kept: np.ndarray  # (N,) bool
    reasons: list[str | None]  # None where kept
    low: float  # the bounds actually applied (-inf/inf: that side open; nan: nothing in play)
    high: float
    rule: str
    params: dict[str, Any]  # the rule's parameters as configured


def _quantile_or(x: np.ndarray, q: float, absolute: float | None) -> float:
    return float(absolute) if absolute is not None else float(np.quantile(x, q))


def band(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """Keep ``[q_low, q_high]`` quantiles of ``x`` (absolute bounds override)."""
    return _quantile_or(x, cfg.q_low, cfg.abs_low), _quantile_or(x, cfg.q_high, cfg.abs_high)


def upper(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """Drop only above the band's upper bound."""
    return -np.inf, _quantile_or(x, cfg.q_high, cfg.abs_high)


def lower(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """Drop only below the band's lower bound."""
    return _quantile_or(x, cfg.q_low, cfg.abs_low), np.inf


def fence(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """median ± k·MAD·1.4826 on the sides that are on; open bounds when MAD is 0."""
    med = float(np.median(x))
    spread = cfg.k * MAD_SCALE * float(np.median(np.abs(x - med)))
    if spread == 0:
        return -np.inf, np.inf
    low = med - spread if cfg.sides in ("both", "low") else -np.inf
    high = med + spread if cfg.sides in ("both", "high") else np.inf
    return low, high


def none(x: np.ndarray, cfg: FilterConfig) -> Bounds:
    """Keep everything in play."""
    return -np.inf, np.inf


RULES: dict[str, Callable[[np.ndarray, FilterConfig], Bounds]] = {
    "band": band,
    "upper": upper,
    "lower": lower,
    "fence": fence,
    "none": none,
}


def rule_params(cfg: FilterConfig) -> dict[str, Any]:
    """The parameters the configured rule reads (what the store records beside it)."""
    keys = {
        "band": ("q_low", "q_high", "abs_low", "abs_high"),
        "upper": ("q_high", "abs_high"),
        "lower": ("q_low", "abs_low"),
        "fence": ("k", "sides"),
        "none": (),
        "random": ("keep", "keep_by_round"),
    }[cfg.rule]
    if cfg.reads_score:
        keys = (*keys, "score", *(("ifd_form",) if cfg.score == "delta_ifd" else ()))
        keys = (*keys, *(("ratio_clip",) if cfg.score == "learner_ratio" else ()))
    return {k: getattr(cfg, k) for k in (*keys, "drop_unfinished")}


@dataclass(frozen=True)
class ScoreColumns:
    """What the generate and score stages stored of one round's samples, (N,) each; None where
    the round did not compute it."""

    n_tokens: np.ndarray
    teacher_cond: np.ndarray  # Σ log p_teacher(y|x)
    generator_cond: np.ndarray | None  # Σ log p_generator(y|x) at sampling (samples table)
    delta_ifd: np.ndarray | None = None  # the stored log-form Δ-IFD
    teacher_resp: np.ndarray | None = None  # Σ log p_teacher(y | view)
    student_cond: np.ndarray | None = None
    student_resp: np.ndarray | None = None


def sample_scores(cols: ScoreColumns, cfg: FilterConfig) -> np.ndarray | None:
    """The score the filter stage's rule reads (``filter.score``, ``filter.ifd_form``); None when
    it reads none there: ``learner_ratio`` (the train step's), or a rule-less round without the
    stored Δ-IFD."""
    if cfg.score == "learner_ratio":
        return None
    if cfg.score == "teacher_nll":
        return teacher_nll(cols.teacher_cond, cols.n_tokens)
    if cfg.score == "conditional":
        if cols.generator_cond is None:
            raise ValueError("filter.score conditional needs samples.sample_logprob_sum")
        return conditional(cols.teacher_cond, cols.generator_cond, cols.n_tokens)
    if cfg.ifd_form == "log_ratio" or cols.student_resp is None:
        return cols.delta_ifd
    assert cols.teacher_resp is not None and cols.student_cond is not None
    return delta_ifd(
        ratio_ifd(cols.teacher_cond, cols.teacher_resp, cols.n_tokens),
        ratio_ifd(cols.student_cond, cols.student_resp, cols.n_tokens),
    )


def random_keep(n: int, share: float, seed: int) -> np.ndarray:
    """``round(share × n)`` of ``n`` rows, uniformly at random from ``seed``. → (n,) bool."""
    kept = np.zeros(n, bool)
    kept[np.random.default_rng(seed).choice(n, round(share * n), replace=False)] = True
    return kept


def apply_filter(
    delta: np.ndarray | None,
    teacher_logprob: np.ndarray,
    response_tokens: np.ndarray,
    finished: np.ndarray,
    cfg: FilterConfig,
    exempt: np.ndarray | None = None,
    *,
    r: int = 0,
    seed: int = 0,
) -> FilterResult:
    """Decide ``kept`` and ``filter_reason`` for one round's samples. Shapes: (N,) each;
    ``delta`` is the rule's score (:func:`sample_scores`), None when not computed (then only a
    rule that needs none may run, or ``learner_ratio``'s, which the train step applies);
    ``exempt`` rows (a fixed source, no generator: ``conditional`` scores them NaN) are checked
    for well-formedness only. ``random`` draws from the run's ``seed`` and round ``r``."""
    later = cfg.score == "learner_ratio"
    if delta is None and cfg.reads_score and not later:
        raise ValueError(f"filter.rule {cfg.rule!r} needs filter.score {cfg.score!r}, not computed")
    n = len(response_tokens)
    d = np.full(n, np.nan) if delta is None else np.asarray(delta, dtype=np.float64)
    free = np.zeros(n, bool) if exempt is None else np.asarray(exempt, dtype=bool)
    bad = ~np.isfinite(np.asarray(teacher_logprob, dtype=np.float64))
    if delta is not None:
        bad |= ~np.isfinite(d) & ~free
    empty = np.asarray(response_tokens) == 0
    unfinished = ~np.asarray(finished, dtype=bool) if cfg.drop_unfinished else np.zeros(n, bool)
    reasons: list[str | None] = [
        "empty" if empty[i] else "unfinished" if unfinished[i] else "non_finite" if bad[i] else None
        for i in range(n)
    ]
    live = np.array([x is None for x in reasons], dtype=bool) & ~free
    low = high = float("nan")
    if cfg.rule == "random":
        drawn = random_keep(int(live.sum()), cfg.keep_at(r), seed_for(seed, "filter-random", r))
        for i in np.flatnonzero(live)[~drawn]:
            reasons[i] = "random"
    elif live.any() and not later:
        low, high = (float(v) for v in RULES[cfg.rule](d[live], cfg))
        for i in np.flatnonzero(live):
            if d[i] < low:
                reasons[i] = "below_band"
            elif d[i] > high:
                reasons[i] = "above_band"
    kept = np.array([x is None for x in reasons], dtype=bool)
    return FilterResult(kept, reasons, low, high, cfg.rule, rule_params(cfg))


def learner_ratio(
    learner_logprob: torch.Tensor, generator_logprob: torch.Tensor, seq_ids: torch.Tensor, n: int
) -> torch.Tensor:
    """Each sequence's mean per-token ``log p_learner(y_t) − log p_generator(y_t)`` over its
    response tokens, from the learner's training forward (no gradient flows through it).

    Shapes: learner_logprob (T,), generator_logprob (T,) (NaN: a token without a generator),
    seq_ids (T,) long in ``[0, n)`` → (n,) float32, NaN for a sequence with no generator token.
    """
    gen = generator_logprob.float()
    has = ~torch.isnan(gen)
    diff = torch.where(has, learner_logprob.detach().float() - gen, torch.zeros_like(gen))
    sums = torch.zeros(n, dtype=torch.float32, device=diff.device).index_add_(0, seq_ids, diff)
    counts = torch.zeros(n, dtype=torch.float32, device=diff.device)
    counts.index_add_(0, seq_ids, has.float())
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))


def step_weights(ratio: np.ndarray, cfg: FilterConfig) -> np.ndarray:
    """Per-sequence weights of one train step under ``filter.score: learner_ratio``: the rule's
    bounds over the step's sequences that have a generator (NaN ratio: a fixed source, exempt,
    weight 1); a sequence beyond them weighs 0; inside, 1, or with ``filter.ratio_clip`` the
    V-trace-style truncated ratio ``min(ratio_clip, exp(ratio))``. (S,) → (S,) float64."""
    r = np.asarray(ratio, dtype=np.float64)
    has = np.isfinite(r)
    w = np.ones(len(r))
    if has.any():
        low, high = RULES[cfg.rule](r[has], cfg)
        inside = (r >= low) & (r <= high)
        if cfg.ratio_clip is not None:
            w[has] = np.minimum(cfg.ratio_clip, np.exp(r[has]))
        w[has & ~inside] = 0.0
    return w


def dropped_kl_share(kept: np.ndarray, kl_sum: np.ndarray | None) -> float | None:
    """Share of the round's forward-KL mass (Σ over tokens and samples) in dropped rows; None
    when the student was not scored (no per-sample KL)."""
    if kl_sum is None:
        return None
    kl = np.nan_to_num(np.asarray(kl_sum, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    total = kl.sum()
    return float(kl[~np.asarray(kept, dtype=bool)].sum() / total) if total > 0 else 0.0
