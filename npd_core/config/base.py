"""What every config section shares: the base model, the deprecation warning, field types."""

from __future__ import annotations

import re
import warnings
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict


def deprecated(message: str) -> None:
    """One ``warning:`` line per message and process (old configs are reloaded by retries)."""
    warnings.warn(f"{message}; update the config", FutureWarning, stacklevel=2)


DEFAULT_EVAL_SET = "heldout"  # the one eval set of a run without eval.sets
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RAY_EXTRA = ("ray", "prefect_ray")  # orchestration.task_runner: ray


def _memory_gb(value: Any) -> Any:
    """A stage's ``memory_gb``: auto, or a positive number of GiB."""
    if value == "auto":
        return value
    gb = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if gb is None or not 0 < gb < float("inf"):
        raise ValueError("give a number of GiB > 0, or auto")
    return float(gb)


# a stage's memory budget (method.batching): GiB, or auto (most free GPU memory; none on CPU)
MemoryGB = Annotated[float | Literal["auto"], BeforeValidator(_memory_gb)]
# packed attention kernels (npd_core/method/attention.py), or auto: the device's fastest exact one
Attention = Literal["auto", "sdpa", "sdpa_varlen", "torch_varlen", "flex_document", "flash_varlen"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
