"""A disk that fills up while a shard or a checkpoint is written: one line naming the path and
saying to free space, and nothing of the write left behind (not even a hidden temp folder).

The disk is a real, tiny tmpfs, so the errors are the ones Arrow, safetensors and torch really
raise (errno 28, "os error 28", a short-write RuntimeError). Mounting needs root with
CAP_SYS_ADMIN; elsewhere these tests skip, and tests/flows/test_bad_input.py injects ENOSPC.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from npd_core.errors import StoreError
from npd_core.models import load_model, load_tokenizer, save_checkpoint
from npd_core.store import Store

FREE = 400 << 10  # bytes left on the disk when the write starts: the student fits, not 1 MiB


@pytest.fixture
def small_disk(tmp_path: Path):
    """An npd store on a 2 MiB tmpfs filled up to its last ``FREE`` bytes."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        store = Store(mnt / "out")
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(mnt).free - FREE))
        yield store
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_shard(small_disk):
    rows = 100_000  # 800 kB of noise
    now = datetime.now(UTC)
    table = pa.table(
        {
            "run_id": ["r"] * rows,
            "round": pa.array([1] * rows, pa.int32()),
            "noise": np.random.default_rng(0).random(rows),  # incompressible
            "created_at": pa.array([now] * rows, pa.timestamp("us", tz="UTC")),
        }
    )
    before = _listing(small_disk.root)
    with pytest.raises(StoreError) as err:
        small_disk.write_stage("r", 1, "generate", {"extra": table})
    msg = str(err.value)
    assert str(small_disk.stage_path("r", 1, "generate")) in msg
    assert "no space left on device" in msg and "free space" in msg and "\n" not in msg
    assert _listing(small_disk.root) == before + ["runs", "runs/r", f"runs/r/{'round=1'}"]


@pytest.mark.parametrize(
    "fails_in", ["weights", "trainer_state"], ids=["safetensors", "torch_save"]
)
def test_checkpoint(fails_in, small_disk, tiny_world):
    """The teacher's weights do not fit (safetensors fails); the student's do, then its 1 MiB
    trainer state does not (torch.save fails with a bare short-write RuntimeError)."""
    src = tiny_world.teacher if fails_in == "weights" else tiny_world.student
    dst = small_disk.root / "runs" / "r" / "checkpoints" / "round=1"
    model, tok = load_model(src), load_tokenizer(src)
    before = _listing(small_disk.root)
    with pytest.raises(StoreError) as err:
        save_checkpoint(model, tok, dst, {"step": 1, "blob": os.urandom(1 << 20)})
    msg = str(err.value)
    assert str(dst) in msg and "no space left on device" in msg and "\n" not in msg
    assert _listing(small_disk.root) == before + ["runs", "runs/r", "runs/r/checkpoints"]
