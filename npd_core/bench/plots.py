"""Plots written as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def delta_ifd_histogram(
    delta: np.ndarray, low: float, high: float, rule: str, title: str, path: Path
) -> Path:
    """Histogram of a round's Δ-IFD with the rule's bounds drawn and the kept range shaded
    (an open side, ±inf, shades to the edge of the data)."""
    d = np.asarray(delta, dtype=float)
    d = d[np.isfinite(d)]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.hist(d, bins=60, color="#4c72b0")
    if len(d) and not (np.isnan(low) or np.isnan(high)):
        lo, hi = max(low, d.min()), min(high, d.max())
        shown = f"[{low:.3f}, {high:.3f}]".replace("inf", "∞")
        ax.axvspan(lo, hi, color="#55a868", alpha=0.2, label=f"{rule}: kept {shown}")
        for bound in (low, high):
            if np.isfinite(bound):
                ax.axvline(bound, color="#c44e52", lw=1.0)
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("Δ-IFD = log IFD_teacher − log IFD_student")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def rule_curves(curves: dict[str, list[tuple[int, float]]], title: str, path: Path) -> Path:
    """Held-out score vs round, one line per filter rule (the filter study's plot)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, c in curves.items():
        if not c:
            continue
        r, s = np.array(c, dtype=float).T
        ref = name == "none-keep"
        ax.plot(r, s, "-" if ref else "--", lw=2.4 if ref else 1.4, marker="o", ms=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out score")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bench_curves(
    curves: dict[str, list[tuple[float, float]]],
    report: dict,
    path: Path,
    by_tokens: dict[str, list[tuple[float, float]]] | None = None,
) -> Path:
    """Held-out score vs training wall clock, one line per variant (mean over seeds), with the
    speedup over onpolicy marked: onpolicy's final score as a level, the two crossing times.
    With ``by_tokens``, a second panel: the same scores vs teacher forward tokens (sample
    efficiency, free of any clock)."""
    main = {"npd": ("#c44e52", 2.6), "onpolicy": ("#4c72b0", 2.0), "sft": ("#55a868", 2.0)}
    palette = ["#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#dd8452"]
    colors = dict(zip([n for n in curves if n not in main], palette, strict=False))
    panels = 2 if by_tokens else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 4.8), dpi=120, squeeze=False)
    ax = axes[0][0]

    def draw(a, data: dict[str, list[tuple[float, float]]]) -> None:
        for name, c in data.items():
            t, s = np.array(c, dtype=float).T
            color, width = main.get(name) or (colors.get(name), 1.2)
            a.plot(t, s, "-" if name in main else "--", color=color, lw=width, marker="o", ms=3,
                   label=name)  # fmt: skip
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="lower right")
        a.set_ylabel("held-out score")

    draw(ax, curves)
    keys = ("speedup_target_score", "onpolicy_s_to_target", "npd_s_to_target")
    target, t_on, t_npd = (report.get(k) for k in keys)
    sp = report.get("speedup_vs_onpolicy")
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        if sp and t_on is not None and t_npd is not None:
            ax.annotate(
                "",
                xy=(t_npd, target),
                xytext=(t_on, target),
                arrowprops=dict(arrowstyle="->", color="black", lw=1.2),
            )
            ax.plot([t_npd, t_on], [target, target], "kx", ms=7)
            label = (
                f"onpolicy's final score: npd at {t_npd:.0f} s, onpolicy at {t_on:.0f} s "
                f"({sp:.2f}× speedup)"
            )
        else:
            label = f"no speedup: {report.get('speedup_reason')}"
        ax.text(
            0.02,
            0.97,
            label,
            transform=ax.transAxes,
            va="top",
            fontsize=9,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.9, edgecolor="grey"),
        )
    ax.set_xlabel("training wall clock, s (evaluation excluded)")
    ax.set_title(
        f"npd bench: {report.get('budget_s', 0):.0f} s per variant, "
        f"held-out {report.get('held_out_size')}, mean over seeds",
        fontsize=10,
    )
    if by_tokens:
        tx = axes[0][1]
        draw(tx, by_tokens)
        if target is not None:
            tx.axhline(target, color="grey", lw=0.8, ls=":")
        tx.set_xscale("symlog", linthresh=1e5)
        tx.set_xlabel("teacher forward tokens (every view, dropped samples included)")
        tx.set_title("the same runs by teacher tokens (sample efficiency)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _interval_err(means: list[float], cis: list) -> np.ndarray:
    """Matplotlib's asymmetric error bars (2 × n: below, above) from 95% intervals; a missing
    interval draws none."""
    lo_hi = [ci or (m, m) for m, ci in zip(means, cis, strict=True)]
    return np.array([[m - c[0] for m, c in zip(means, lo_hi, strict=True)],
                     [c[1] - m for m, c in zip(means, lo_hi, strict=True)]])  # fmt: skip


def junk_auroc(summary: dict[str, dict[str, dict]], title: str, path: Path) -> Path:
    """``npd bench filter --stage junk``'s AUROC per score, one bar per kind of junk (all,
    stale, loop) with its bootstrap 95% interval; 0.5 is chance, below it the other tail."""
    scores, kinds = list(summary), ["all", "stale", "loop"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        means = [summary[s][kind]["mean"] for s in scores]
        err = _interval_err(means, [summary[s][kind]["ci95"] for s in scores])
        x = np.arange(len(scores)) + (j - 1) * width
        ax.bar(x, means, width, yerr=err, capsize=2, label=kind)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(np.arange(len(scores)), scores, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC for the planted junk")
    ax.set_title(title)
    ax.legend(title="junk", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rule_finals(rows: list[dict], title: str, path: Path) -> Path:
    """The trained filter comparison's final score per rule and score (``summary`` rows: mean
    over seeds with its 95% interval), one marker per junk condition; the dashed lines are
    ``none-keep``'s, the reference every rule is read against."""
    label = lambda r: f"{r['rule']} {r['score'] or ''}".strip()  # noqa: E731
    labels = list(dict.fromkeys(map(label, rows)))
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.4), dpi=120)
    for k, junk in enumerate(dict.fromkeys(r["junk"] for r in rows)):
        mine = [r for r in rows if r["junk"] == junk]
        y = [labels.index(label(r)) + (k - 0.5) * 0.3 for r in mine]
        x = [r["final_score"] for r in mine]
        err = _interval_err(x, [r["final_score_ci95"] for r in mine])
        line = ax.errorbar(x, y, xerr=err, fmt="o", ms=4, capsize=2, label=junk)
        ref = [r["final_score"] for r in mine if r["rule"] == "none-keep"]
        if ref:
            ax.axvline(ref[0], color=line[0].get_color(), lw=0.8, ls="--")
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("final score (mean of the last quarter's evaluations), 95% over seeds")
    ax.set_title(title, fontsize=10)
    ax.legend(title="planted junk", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
