"""A light rank module for tests/npd_core/pipeline/test_workers.py (torch only, no model): each
rank answers a job with its rank; rank 0 first reports the job as progress. A job ``("raise",
k)`` makes rank k raise."""

import torch.distributed as dist

from npd_core.pipeline import workers


def answer(job, progress):
    kind, arg = job
    progress(job)
    if kind == "raise" and dist.get_rank() == arg:
        raise ValueError(f"rank {arg} was asked to raise")
    dist.barrier()  # every job is collective, as a training round is
    return dist.get_rank()


if __name__ == "__main__":
    workers.serve(answer)
