"""Prompt files: JSONL with ``prompt`` (required), ``id`` and ``answer`` (optional).

Every problem is reported with the file and line number, since a bad line found at 3 a.m. in
round 5 costs a night; the whole file is validated before a run starts.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from npd_core.errors import DataError
from npd_core.seeds import seed_for


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    answer: str | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read and validate a prompts JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: prompts file not found; give a JSONL file with a 'prompt' field")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text; re-encode the file as UTF-8") from None
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{p}:{n}: malformed JSON ({err.msg}); one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{p}:{n}: expected a JSON object with a 'prompt' field")
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise DataError(f"{p}:{n}: missing or non-string 'prompt' field")
        if not prompt.strip():
            raise DataError(f"{p}:{n}: empty 'prompt'; remove the line or fill it in")
        pid = row.get("id", f"{p.stem}-{n}")
        if not isinstance(pid, str | int) or isinstance(pid, bool):
            raise DataError(f"{p}:{n}: 'id' must be a string or integer")
        pid = str(pid)
        if pid in seen:
            raise DataError(
                f"{p}:{n}: duplicate id {pid!r} (first on line {seen[pid]}); ids must be unique"
            )
        seen[pid] = n
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise DataError(f"{p}:{n}: 'answer' must be a string")
        out.append(Prompt(pid, prompt, answer))
    if not out:
        raise DataError(f'{p}: no prompts in file; add JSONL lines like {{"prompt": "..."}}')
    return out


def read_prompt_glob(pattern: str | Path) -> list[Prompt]:
    """Read a prompts file, or every file a glob matches, concatenated in sorted path order
    (nightly runs point at a folder that grows a file a day). Ids must be unique across files."""
    if not glob.has_magic(str(pattern)):
        return read_prompts(pattern)
    files = sorted(glob.glob(str(pattern), recursive=True))
    if not files:
        raise DataError(f"data.prompts: no file matches {pattern}; check the glob")
    out: list[Prompt] = []
    first: dict[str, str] = {}
    for f in files:
        for p in read_prompts(f):
            if p.id in first:
                raise DataError(
                    f"{f}: duplicate id {p.id!r} (also in {first[p.id]}); "
                    "ids must be unique across the files of data.prompts"
                )
            first[p.id] = f
            out.append(p)
    return out


def write_prompts(path: str | Path, prompts: list[Prompt]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for q in prompts:
            row = {"id": q.id, "prompt": q.prompt}
            if q.answer is not None:
                row["answer"] = q.answer
            f.write(json.dumps(row) + "\n")


def round_prompts(prompts: list[Prompt], n: int, seed: int, round_: int) -> list[Prompt]:
    """The prompts of one round: a seeded sample without replacement (cycling if n > len)."""
    rng = random.Random(seed_for(seed, "prompts", round_))
    if n >= len(prompts):
        return prompts[:]
    return rng.sample(prompts, n)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
