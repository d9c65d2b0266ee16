"""The names ``eval.metric`` accepts, apart from the metrics themselves: the config validates a
run's metric at load time without importing the method (``npd_core.method.answers`` holds the
functions and checks at import that it has one for each name here)."""

from __future__ import annotations

import re

METRIC_NAMES = ("exact", "normalized", "contains", "boxed", "gsm8k", "final_line", "lines", "regex")
PYTHON_METRIC = re.compile(r"python:([A-Za-z_][\w.]*):([A-Za-z_]\w*)")  # a user's own
