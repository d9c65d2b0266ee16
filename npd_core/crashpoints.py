"""Deterministic points where a rehearsal stops the process, so that a test (or a user
rehearsing a crash) can ``kill -9`` it exactly there instead of racing a timer.

With ``NPD_PAUSE_AT=<point>`` the process sends itself SIGSTOP on reaching that point; the
parent sees it stop (``waitpid(pid, WUNTRACED)``) and kills it. Points:
``train:<round>:<k>`` after the k-th optimizer step of a round, ``write:<stage>:<round>`` when a
store stage is written into its temp folder but not yet renamed into place,
``checkpoint:round=<k>`` when θ_k is written into its temp folder but not yet renamed (by
torchrun rank 0 when ``train.nproc`` > 1), ``rank<j>:train:<round>:<k>`` in torchrun rank j of
such a train stage after its k-th step.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "NPD_PAUSE_AT"


def pause_point(point: str) -> None:
    """Stop this process here when ``NPD_PAUSE_AT`` names ``point``; otherwise do nothing."""
    if os.environ.get(ENV) == point:
        # To this thread, not the process: a process-directed SIGSTOP may be taken by the main
        # thread while this one runs on for a moment (long enough to rename a folder).
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
