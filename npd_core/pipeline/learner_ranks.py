"""What each torchrun rank of a train stage on ``train.nproc`` processes runs
(``python -m npd_core.pipeline.learner_ranks``, started by ``learner.learn_on_ranks`` through
``workers.WorkerGroup``): one job per round, in which every rank runs ``learn_round`` on its
share of each step's rows and rank 0 writes θ_r and returns the round's stats and I/O spans.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from npd_core import iotime
from npd_core.crashpoints import pause_point
from npd_core.method.train import StepLog
from npd_core.pipeline import workers
from npd_core.pipeline.learner import learn_round
from npd_core.pipeline.round_rows import packed_round
from npd_core.pipeline.spec import RunSpec


def train_job(job: dict[str, Any], progress: workers.Progress) -> dict[str, Any]:
    """Round ``job["round"]`` of the run ``job["spec"]`` on ``job["threads"]`` threads."""
    torch.set_num_threads(job["threads"])
    spec, r = RunSpec(**job["spec"]), job["round"]
    steps = itertools.count(1)

    def on_step(entry: StepLog) -> None:
        progress(asdict(entry))
        pause_point(f"rank{dist.get_rank()}:train:{r}:{next(steps)}")

    with iotime.recording() as spans:
        stats, step = learn_round(spec, r, packed_round(spec, r), on_step, parallel=True)
    return {"stats": asdict(stats), "step": step, "io_spans": spans}


if __name__ == "__main__":
    workers.serve(train_job)
