"""Strict JSON out of floats: every ``--json`` output and bench file goes through ``finite``."""

from __future__ import annotations

import math
from typing import Any


def finite(x: Any) -> Any:
    """NaN/inf → null, tuples → lists, so the JSON stays strict (a round that kept no sample has
    no mean loss; an interval that cannot be computed is NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x
