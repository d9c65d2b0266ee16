"""atomic_dir: the folder a reader finds is the old one or the new one, whole, whatever fails
(the block, the swap, a full disk); nothing hidden is left behind. Store stages and checkpoints
both write through it (tests/npd_core/store covers the stage side and a real full disk)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from npd_core.atomic import atomic_dir
from npd_core.errors import StoreError
from npd_core.models import load_model, load_tokenizer, load_trainer_state, save_checkpoint


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture
def old(tmp_path: Path) -> Path:
    final = tmp_path / "stage"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("old b")
    return final


def _fail_swap(monkeypatch) -> list[tuple[str, str]]:
    """Make the rename of the temp folder onto ``final`` fail; other renames go through."""
    calls, real = [], os.rename

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if ".tmp-" in Path(src).name:
            raise OSError(errno.EXDEV, "rename refused by the test", str(src))
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def test_replaces_whole(old: Path) -> None:
    assert _tree(old) == {"a.txt": b"old a", "sub/b.txt": b"old b"}
    with atomic_dir(old) as tmp:
        assert tmp.parent == old.parent and tmp.name.startswith(".stage.tmp-")
        assert _tree(tmp) == {}
        (tmp / "c.txt").write_text("new c")
    assert _tree(old) == {"c.txt": b"new c"}
    assert _hidden(old.parent) == []


def test_error_in_block_keeps_old(old: Path) -> None:
    with pytest.raises(ValueError, match="half way"), atomic_dir(old) as tmp:
        (tmp / "a.txt").write_text("new a")
        raise ValueError("half way")
    assert _tree(old) == {"a.txt": b"old a", "sub/b.txt": b"old b"}
    assert _hidden(old.parent) == []


def test_failed_swap_rolls_back(old: Path, monkeypatch) -> None:
    calls = _fail_swap(monkeypatch)
    with pytest.raises(OSError, match="refused by the test"), atomic_dir(old) as tmp:
        (tmp / "a.txt").write_text("new a")
    # old moved to trash, the temp refused, the trash renamed back
    assert [(src.rsplit("-", 1)[0], dst.rsplit("-", 1)[0]) for src, dst in calls] == [
        ("stage", ".stage.trash"),
        (".stage.tmp", "stage"),
        (".stage.trash", "stage"),
    ]
    assert _tree(old) == {"a.txt": b"old a", "sub/b.txt": b"old b"}
    assert _hidden(old.parent) == []


def test_full_disk_is_one_line(tmp_path: Path) -> None:
    final = tmp_path / "round=1"
    with pytest.raises(StoreError) as err, atomic_dir(final) as tmp:
        (tmp / "w").write_text("x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(final) in str(err.value) and "no space left on device" in str(err.value)
    assert not final.exists() and _hidden(tmp_path) == []


def test_checkpoint_rollback(tiny_world, tmp_path: Path, monkeypatch) -> None:
    """A checkpoint rewritten over round=1 that fails (in torch.save, or in the swap) leaves
    the previous round=1 byte for byte, with its trainer state, and no hidden folder."""
    model, tok = load_model(tiny_world.student), load_tokenizer(tiny_world.student)
    path = tmp_path / "checkpoints" / "round=1"
    assert save_checkpoint(model, tok, path, {"step": 7}) == path
    before = _tree(path)
    assert "model.safetensors" in before and load_trainer_state(path) == {"step": 7}

    with pytest.raises(AttributeError):  # a local function cannot be pickled
        save_checkpoint(model, tok, path, {"step": 8, "fn": lambda: None})
    assert _tree(path) == before and _hidden(path.parent) == []

    _fail_swap(monkeypatch)
    with pytest.raises(OSError, match="refused by the test"):
        save_checkpoint(model, tok, path, {"step": 9})
    assert _tree(path) == before and _hidden(path.parent) == []
    assert load_trainer_state(path) == {"step": 7}
