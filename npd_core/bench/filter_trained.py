"""The filter study's trained stage (``npd bench filter --stage trained``): its cells, the matched
random drop and the decision rule, all as docs/filter.md fixed them before it ran.

At staleness 4, with planted junk (``generate.plant_junk`` 0.15) and without it, seeds 0–2 paired
across rules: ``none`` keeping unfinished samples; the two scores with the highest mean junk AUROC
(``--stage junk``'s summary; ties: the order of ``SCORES``) and ``conditional``, each under
``fence`` (k = 3 on its bad tail) and ``band`` (quantiles 0.05–0.90); after each fence cell, a
``random`` drop keeping, round by round, the share that fence cell kept. A cell's score is the
bench's final score (:func:`npd_core.bench.curves.final_score`: the mean of the evaluations in the
last quarter of the budget's clock, at least two).

Every cell is one NPD run (``flows.filter_study`` runs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from npd_core.bench.filter_study import mean_by_round
from npd_core.bench.stats import diff_ci, mean_ci
from npd_core.errors import ConfigError

STALENESS = 4
SEEDS = 3
JUNK = {"junk": 0.15, "clean": 0.0}  # condition → generate.plant_junk
# the junk stage's scores in the docs' table order (ties), each as a filter section
SCORES: dict[str, dict[str, Any]] = {
    "delta_ifd": {"score": "delta_ifd", "ifd_form": "log_ratio"},
    "delta_ifd_ratio": {"score": "delta_ifd", "ifd_form": "ratio"},
    "conditional": {"score": "conditional"},
    "teacher_nll": {"score": "teacher_nll"},
    "learner_ratio": {"score": "learner_ratio"},
}
BAD_TAIL = {"delta_ifd": "high", "conditional": "high", "teacher_nll": "high"}  # else both
RULES: dict[str, dict[str, Any]] = {
    "none-keep": {"rule": "none", "drop_unfinished": False},
    "fence": {"rule": "fence", "k": 3.0, "drop_unfinished": False},
    "band": {"rule": "band", "q_low": 0.05, "q_high": 0.90, "drop_unfinished": False},
    "random": {"rule": "random", "drop_unfinished": False},
}
REFERENCE = "none-keep"
CONTROL = "conditional"
BEST = 2  # the scores taken from the junk stage
MAX_COST = 1.0  # points: without junk a recommended score loses at most this to the reference
CELL_WALL = 1.45  # a cell's wall clock ÷ its budget (the confirm stage: 27 × 140 s in 90 min)
FINAL_RULE = (
    "curves.final_score: the mean of the evaluations in the last quarter of the budget's clock, "
    "at least the last two"
)


@dataclass(frozen=True)
class TrainedCell:
    rule: str  # a key of RULES
    score: str | None  # a key of SCORES (random: its fence cell's); None for the reference
    junk: str  # a key of JUNK
    seed: int

    @property
    def name(self) -> str:
        return "-".join(x for x in (self.rule, self.score, self.junk, f"s{self.seed}") if x)

    @property
    def matches(self) -> str | None:
        """The fence cell whose kept shares a random cell copies."""
        if self.rule != "random":
            return None
        return TrainedCell("fence", self.score, self.junk, self.seed).name

    def overrides(self, keep_by_round: dict[int, float] | None = None) -> dict[str, Any]:
        """The cell's config: staleness, planted junk and filter section (a random cell's
        ``keep_by_round`` from :func:`kept_shares` of its fence cell)."""
        f: dict[str, Any] = {**RULES[self.rule], "compute_delta_ifd": True}
        if self.rule in ("fence", "band"):
            assert self.score is not None
            f.update(SCORES[self.score])
        if self.rule == "fence":
            f["sides"] = BAD_TAIL.get(SCORES[self.score]["score"], "both")
        if self.rule == "random":
            if not keep_by_round:
                raise ConfigError(f"{self.name}: no kept shares of {self.matches} to match")
            shares = {int(r): float(x) for r, x in keep_by_round.items()}  # JSON keys: str
            f["keep"] = float(np.mean(list(shares.values())))
            f["keep_by_round"] = shares
        return {"staleness": STALENESS, "generate": {"plant_junk": JUNK[self.junk]}, "filter": f}


def best_scores(junk_summary: dict[str, Any]) -> list[str]:
    """The ``BEST`` scores with the highest mean AUROC over all junk (ties: ``SCORES`` order)."""
    missing = [s for s in SCORES if s not in junk_summary]
    if missing:
        raise ConfigError(f"the junk stage's summary has no {missing}: run --stage junk again")
    order = list(SCORES)
    means = {s: junk_summary[s]["all"]["mean"] for s in SCORES}
    return sorted(SCORES, key=lambda s: (-means[s], order.index(s)))[:BEST]


def trained_cells(best: list[str]) -> list[TrainedCell]:
    """Per seed and junk condition: the reference, then each score's fence cell and its random
    drop, then each score's band cell (the best scores, then ``conditional`` if not among them)."""
    scores = [*best, *([CONTROL] if CONTROL not in best else [])]
    out = []
    for seed in range(SEEDS):
        for junk in JUNK:
            out.append(TrainedCell(REFERENCE, None, junk, seed))
            for s in scores:
                out += [TrainedCell("fence", s, junk, seed), TrainedCell("random", s, junk, seed)]
            out += [TrainedCell("band", s, junk, seed) for s in scores]
    return out


# the share of the well-formed samples kept, of all and of the junk, per round: by the filter
# stage, or for a rule applied in the train step (learner_ratio) of the sample-steps weighing > 0
KEPT_SQL = """
SELECT round,
       avg(kept::INT) FILTER (WHERE filter_reason IS NULL
                              OR filter_reason IN ('below_band', 'above_band', 'random')) AS kept,
       avg(kept::INT) FILTER (WHERE source LIKE 'junk-%' AND (filter_reason IS NULL
                              OR filter_reason IN ('below_band', 'above_band', 'random'))) AS junk
FROM samples WHERE run_id = ? GROUP BY round ORDER BY round
"""
STEP_KEPT_SQL = """
SELECT w.round, avg((w.weight > 0)::INT) AS kept,
       avg((w.weight > 0)::INT) FILTER (WHERE g.source LIKE 'junk-%') AS junk
FROM step_weights AS w JOIN samples AS g USING (run_id, round, prompt_id, sample_idx)
WHERE w.run_id = ? GROUP BY w.round ORDER BY w.round
"""


def kept_stats(out: Any, run_id: str, in_steps: bool) -> dict[str, Any]:
    """A cell's kept share per round (``kept_by_round``: what its random drop copies) and, as a
    mean over rounds, of all its well-formed samples and of its junk."""
    from npd_core.store import Store

    rows = Store(out, create=False).query(STEP_KEPT_SQL if in_steps else KEPT_SQL, [run_id])
    rows = rows.to_pylist()
    return {
        "kept_by_round": {int(r["round"]): r["kept"] for r in rows if r["kept"] is not None},
        "kept_share": _mean(r["kept"] for r in rows),
        "junk_kept_share": _mean(r["junk"] for r in rows),
    }


def in_steps(cell: TrainedCell) -> bool:
    """Whether the cell's rule is applied in the train step (a rule on learner_ratio)."""
    return cell.rule in ("fence", "band") and cell.score == "learner_ratio"


def decide(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The pre-registered rule: a score earns a recommendation if, under some rule, (1) with
    junk, the Welch 95% interval of its mean final score minus the matched random drop's, and
    minus ``conditional``'s under the same rule (not for ``conditional`` itself), lies above 0;
    (2) without junk, its mean final score is at least the reference's minus ``MAX_COST``.
    Only fence cells have a matched random drop, so a band cell cannot pass (1)."""
    finals: dict[tuple[str, str | None, str], list[float]] = {}
    for c in cells:
        finals.setdefault((c["rule"], c["score"], c["junk"]), []).append(c["final_score"])
    ref = finals.get((REFERENCE, None, "clean"), [])
    out: dict[str, Any] = {}
    passing: list[tuple[float, str, str]] = []
    scores = [s for s in SCORES if any(k[1] == s for k in finals)]
    for s in scores:
        for rule in ("fence", "band"):
            mine = finals.get((rule, s, "junk"), [])
            if not mine:
                continue
            rand = finals.get(("random", s, "junk"), []) if rule == "fence" else []
            ci_random = diff_ci(mine, rand)
            ci_control = (
                None if s == CONTROL else diff_ci(mine, finals.get((rule, CONTROL, "junk"), []))
            )
            clean = finals.get((rule, s, "clean"), [])
            cost = float(np.mean(clean) - np.mean(ref)) if clean and ref else None
            beats_random = ci_random is not None and ci_random[0] > 0
            beats_control = s == CONTROL or (ci_control is not None and ci_control[0] > 0)
            cheap = cost is not None and cost >= -MAX_COST
            ok = beats_random and beats_control and cheap
            out[f"{rule}-{s}"] = {
                "vs_random_ci95": ci_random,
                "vs_conditional_ci95": ci_control,
                "clean_vs_reference": cost,
                "beats_random": beats_random,
                "beats_conditional": beats_control,
                "costs_at_most_1": cheap,
                "recommended": ok,
            }
            if ok:
                passing.append((float(np.mean(mine)), s, rule))
    passing.sort(key=lambda x: -x[0])
    return {
        "reference": REFERENCE,
        "comparisons": out,
        "recommended": [{"score": s, "rule": r, "junk_final": m} for m, s, r in passing],
        "note": "only fence cells have a matched random drop (the rule pre-registers one per "
        "fence cell), so band cells cannot meet condition 1",
    }


def summary(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (junk condition, rule, score): means over seeds and the seeds' interval."""
    keys = list(dict.fromkeys((c["junk"], c["rule"], c["score"]) for c in cells))
    rows = []
    for junk, rule, score in keys:
        group = [c for c in cells if (c["junk"], c["rule"], c["score"]) == (junk, rule, score)]
        finals = [c["final_score"] for c in group]
        rows.append(
            {
                "junk": junk,
                "rule": rule,
                "score": score,
                "seeds": len(group),
                "final_score": float(np.mean(finals)),
                "final_score_ci95": mean_ci(finals),
                "kept_share": _mean(c["kept_share"] for c in group),
                "junk_kept_share": _mean(c["junk_kept_share"] for c in group),
                "rounds": float(np.mean([len(c["rounds"]) for c in group])),
            }
        )
    return rows


def _mean(values: Any) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def plotted_means(done: list[dict[str, Any]], junk: str) -> dict[str, list[tuple[int, float]]]:
    """Each (rule, score)'s mean score by round over its seeds under one junk condition."""
    mine = [c for c in done if c["junk"] == junk]
    names = dict.fromkeys((c["rule"], c["score"]) for c in mine)
    return {
        "-".join(x for x in (rule, score) if x): mean_by_round(
            [c for c in mine if (c["rule"], c["score"]) == (rule, score)]
        )
        for rule, score in names
    }
