"""NPD's ablations in ``npd bench``: each a name and the config it changes (the rest of the run
is the ``npd`` variant's, with NPD's searched hyperparameters)."""

from __future__ import annotations

from typing import Any

from npd_core.config import NPDConfig

FILTER_RULES = ("none", "band", "fence")  # the ablations' rules: the filter study's confirm set
STEP_FACTORS = (0.5, 2.0)  # the steps-per-round ablations: half and twice the default's steps
STALENESS = (0, 2, 4)  # the staleness ablations (those the config does not use)
MIX_FRACTION = 0.5  # the mixed-data ablations' fixed-source share (GKD's 1 − λ at λ = 0.5)


def ablations(cfg: NPDConfig) -> dict[str, dict[str, Any]]:
    """Name → config overrides: the filter settings ``cfg`` does not use, the staleness values
    of ``STALENESS`` it does not use, rounds of half and twice its optimizer steps, and the
    on-policy levers it does not use (:func:`lever_ablations`)."""
    return {
        **filter_ablations(cfg),
        **{f"staleness-{s}": {"staleness": s} for s in STALENESS if s != cfg.staleness},
        **{f"steps-x{f:g}": _scaled_steps(cfg, f) for f in STEP_FACTORS},
        **lever_ablations(cfg),
    }


def lever_ablations(cfg: NPDConfig) -> dict[str, dict[str, Any]]:
    """The on-policy levers ``cfg`` leaves off, one at a time: mixed data from the teacher's
    samples or the reference answers (``data.mix``), per-sequence normalisation, the tail
    bucket (``train.rest_mass``, for the loss in use), and the losses it does not use of forward
    KL, reverse KL and the sampled-token reverse KL with its truncated importance ratio."""
    t = cfg.train
    out: dict[str, dict[str, Any]] = {}
    if cfg.data.mix.fraction == 0:
        for source in ("teacher", "reference"):
            out[f"mix-{source}"] = {"data": {"mix": {"fraction": MIX_FRACTION, "source": source}}}
    if t.normalize != "sequence":
        out["normalize-sequence"] = {"train": {"normalize": "sequence"}}
    if not t.rest_mass and t.loss in ("forward_kl", "reverse_kl", "jsd"):
        out["rest-mass"] = {"train": {"rest_mass": True}}
    for loss in ("forward_kl", "reverse_kl", "sampled_reverse_kl"):
        if t.loss != loss:
            out[loss.replace("_", "-")] = {"train": {"loss": loss}}
    return out


def filter_ablations(cfg: NPDConfig) -> dict[str, dict[str, Any]]:
    """The filter settings the config does not use: each of ``FILTER_RULES`` but its own rule,
    and the other choice of ``drop_unfinished`` (the filter study's default is rule ``none``
    keeping unfinished samples, so by default these are band, fence and drop-unfinished)."""
    out: dict[str, dict[str, Any]] = {
        f"filter-{rule}": {"filter": {"rule": rule}}
        for rule in FILTER_RULES
        if rule != cfg.filter.rule
    }
    flip = not cfg.filter.drop_unfinished
    out["drop-unfinished" if flip else "keep-unfinished"] = {"filter": {"drop_unfinished": flip}}
    return out


def _scaled_steps(cfg: NPDConfig, factor: float) -> dict[str, Any]:
    """A round of ``factor`` × the default's optimizer steps: a round takes
    min(steps_per_round, epochs_per_round × its rows ÷ rows_per_step) steps, so both bounds
    scale (on the toy the epoch bound is the one that binds)."""
    t = cfg.train
    return {
        "train": {
            "steps_per_round": max(1, round(t.steps_per_round * factor)),
            "epochs_per_round": t.epochs_per_round * factor,
        }
    }
