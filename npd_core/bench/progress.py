"""What a bench has finished, saved after each step (``<out>/<bench_id>/progress.json``), so that
``npd bench --resume BENCH_ID`` runs only what is left: the probes' figures, each search run's
score, the search's choice and each finished (variant, seed) run are kept; a run that was cut
short runs again from its start under a new run id (``attempt``), so no clock ever counts a
stage of an earlier process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from npd_core.atomic import atomic_file
from npd_core.bench.harness import Hyper, VariantResult
from npd_core.errors import ConfigError
from npd_core.jsonsafe import finite

FILE = "progress.json"


@dataclass
class Progress:
    """A bench's finished work. ``plan``: the settings it was planned with (a resume must
    plan the same); ``attempt``: how many times it was resumed."""

    folder: Path
    plan: dict[str, Any]
    started: float  # time.time() when the bench was first planned
    attempt: int = 0
    calibration: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    chosen: dict[str, Hyper] | None = None  # by method, once the search finished
    search_scores: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    results: dict[str, list[VariantResult]] = field(default_factory=dict)  # by variant, seed
    # each finished search run's score by its key, so a search stopped part-way replays them
    points: dict[str, float] = field(default_factory=dict)
    # the machine of each attempt (``bench.machine``): a bench resumed elsewhere says so, and
    # its runs' ids name their attempt (``-a1-``)
    machines: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def resume(cls, folder: Path, plan: dict[str, Any]) -> Progress:
        """The saved progress of the bench in ``folder``, one attempt later; a ConfigError
        when there is none or it was planned with other settings than ``plan``."""
        path = folder / FILE
        if not path.is_file():
            raise ConfigError(f"--resume {folder.name}: no {path}; check --out and the bench id")
        saved = json.loads(path.read_text())
        differ = sorted(
            k for k in plan.keys() | saved["plan"].keys() if plan.get(k) != saved["plan"].get(k)
        )
        if differ:
            was = ", ".join(f"{k}={saved['plan'].get(k)!r}" for k in differ)
            raise ConfigError(
                f"--resume {folder.name}: planned with {was}; pass the same options as then"
            )
        chosen = saved["chosen"]
        return cls(
            folder,
            plan,
            saved["started"],
            saved["attempt"] + 1,
            saved["calibration"],
            {m: Hyper(**h) for m, h in chosen.items()} if chosen is not None else None,
            saved["search_scores"],
            {n: [VariantResult(**r) for r in rs] for n, rs in saved["results"].items()},
            saved.get("points", {}),  # a bench saved before search points were kept: none
            saved.get("machines", []),
        )

    def scored(self, key: str, run: Callable[[], float]) -> float:
        """The search run ``key``'s score: the saved one, else ``run()``'s, saved at once (the
        search is a function of its scores, so replaying them retraces it)."""
        if key not in self.points:
            self.points[key] = run()
            self.save()
        return self.points[key]

    def save(self) -> None:
        """Write it whole (a reader never sees half a file)."""
        data = {
            "plan": self.plan,
            "started": self.started,
            "attempt": self.attempt,
            "calibration": self.calibration,
            "chosen": {m: asdict(h) for m, h in self.chosen.items()} if self.chosen else None,
            "search_scores": self.search_scores,
            "results": {n: [asdict(r) for r in rs] for n, rs in self.results.items()},
            "points": self.points,
            "machines": self.machines,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / FILE) as tmp:
            tmp.write_text(json.dumps(finite(data), indent=1))
