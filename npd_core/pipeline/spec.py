"""What a run's stages share: the run's spec (``RunSpec``) and which checkpoint generates a
round's data. Plain data, so it crosses process lines and Prefect persists it; the stages
themselves are in ``stages.py``, what they return in ``results.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from npd_core.atomic import atomic_file
from npd_core.config import NPDConfig
from npd_core.errors import StoreUsageError
from npd_core.pipeline.results import StageResult
from npd_core.store import Store

__all__ = ["RunSpec", "StageResult", "generator_round", "rel_path"]  # StageResult: results.py


@dataclass
class RunSpec:
    """What every stage of a run needs to know; plain data, so it can cross process lines."""

    root: str  # output directory
    run_id: str
    config: dict[str, Any]  # NPDConfig.model_dump(mode="json")
    teacher: str  # checkpoint dir
    student: str  # θ_0 checkpoint dir
    train_prompts: str  # JSONL
    eval_prompts: str  # the primary eval set's prompts (eval.sets names the others)
    deployment: str | None = None  # lineage of scheduled runs ("<flow>/<deployment>")
    parent_run_id: str | None = None  # the run whose checkpoint ``student`` is
    parent_round: int | None = None
    # packed-attention kernel per role ("train", "score_teacher", "score_student"), chosen once
    # at the run's start (``kernels.choose_attention``) and reused by every retry and resume;
    # None = not chosen yet; {} or a missing role = the fixed kernel (``attention.FIXED``), what
    # runs begun before choices were recorded used
    attention: dict[str, str] | None = None
    # torch threads of each stage, fixed at the run's start (``with_threads``) so a retry or a
    # resume on another machine computes in the same order; None (runs begun before it was
    # recorded) = resolved from the config on the machine that runs the stage, as they were
    threads: int | None = None
    # eval set name → its prompts file, in the config's order (eval.sets); None (runs begun
    # before eval sets) = the one set ``eval_prompts`` under the primary set's name
    eval_set_paths: dict[str, str] | None = None

    @cached_property
    def cfg(self) -> NPDConfig:
        """The validated config, once per spec (every stage reads it many times)."""
        return NPDConfig.model_validate(self.config)

    @cached_property
    def store(self) -> Store:
        """The run's store, opened once per spec."""
        return Store(self.root, create=False)

    @staticmethod
    def path(root: str | Path, run_id: str) -> Path:
        """Where a run's spec is kept: ``runs/<run_id>/run/spec.json``."""
        return Path(root) / "runs" / run_id / "run" / "spec.json"

    def save(self) -> Path:
        """Write the spec (temp + rename) so the run can be retried."""
        path = self.path(self.root, self.run_id)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        return path

    @classmethod
    def load(cls, root: str | Path, run_id: str) -> RunSpec:
        path = cls.path(root, run_id)
        if not path.is_file():
            raise StoreUsageError(
                f"{Path(root) / 'npd.duckdb'}: no run {run_id!r} to retry; "
                f"`npd status --out {root}` lists the runs"
            )
        data = {"attention": {}, **json.loads(path.read_text()), "root": str(root)}
        return cls(**data)  # a spec saved before ``attention`` existed: the fixed kernels

    def stage_threads(self) -> int:
        """Torch threads of every stage of this run (``threads``, else the config's rule)."""
        cfg = self.cfg
        return self.threads or cfg.stage_threads(concurrent=cfg.staleness > 0)

    def with_threads(self) -> RunSpec:
        """This spec with its stages' threads recorded (unchanged when they already are, or
        when it is an old run's spec, which never recorded them: it keeps resolving them)."""
        if self.threads is not None or self.attention is not None:
            return self
        return replace(self, threads=self.stage_threads())

    def kernel(self, role: str) -> str | None:
        """The recorded packed-attention kernel of ``role``; None = the fixed one."""
        return (self.attention or {}).get(role)

    def eval_sets(self) -> dict[str, str]:
        """Eval set name → prompts file of every set this run scores."""
        return self.eval_set_paths or {self.cfg.eval.primary_set: self.eval_prompts}

    def checkpoint(self, k: int) -> str:
        """Directory of θ_k (θ_0 is the initial student, not copied)."""
        if k == 0:
            return self.student
        return str(Path(self.root) / "runs" / self.run_id / "checkpoints" / f"round={k}")


def generator_round(r: int, staleness: int) -> int:
    """Index of the checkpoint that generates D_r."""
    return max(0, r - 1 - staleness)


def rel_path(root: str, path: str) -> str:
    """Path relative to the output directory when inside it, so the directory can move."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())
