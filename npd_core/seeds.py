"""One seed scheme for the whole pipeline.

Every random draw of a run is keyed by *what* it is for, never by how the work was split:
``seed_for(seed, stage, round, *keys)`` hashes the run seed and the draw's coordinates (a
sample's prompt id and index, a learner step…) into a 63-bit seed. A hash, unlike ad-hoc
multipliers (``seed * 7919 + r``), cannot collide between stages or rounds by arithmetic
accident, and the same coordinates give the same seed on any worker, in any order.

Sampling turns a sample's seed into noise in ``npd_core/method/noise.py``. This module imports
no torch, so the config, the store and `npd status` load without it.
"""

from __future__ import annotations

import hashlib
import json


def seed_for(seed: int, stage: str, round_: int | None = None, *keys: int | str) -> int:
    """A 63-bit seed for the draw of ``stage`` in ``round_`` at ``keys`` (e.g. prompt id, sample
    index). Stable across processes and Python versions (blake2b of the JSON of the inputs)."""
    blob = json.dumps([int(seed), stage, round_, *keys], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1
