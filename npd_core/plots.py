"""Plots written as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def delta_ifd_histogram(delta: np.ndarray, low: float, high: float, title: str, path: Path) -> Path:
    """Histogram of a round's Δ-IFD with the kept band shaded."""
    d = np.asarray(delta, dtype=float)
    d = d[np.isfinite(d)]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.hist(d, bins=60, color="#4c72b0")
    if np.isfinite(low) and np.isfinite(high):
        ax.axvspan(low, high, color="#55a868", alpha=0.2, label=f"kept [{low:.3f}, {high:.3f}]")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("Δ-IFD = log IFD_teacher − log IFD_student")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
