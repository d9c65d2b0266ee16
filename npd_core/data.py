"""Prompt sets the way users keep them: JSONL, Parquet (a file, a glob or a folder of shards) or
a ``datasets`` ``save_to_disk`` folder; each row holds a prompt string or a conversation (a list
of ``{"role", "content"}`` turns, TRL's formats), and optionally an id and a reference answer.

Every problem is reported with the file, the line (JSONL) or row (counted from 0, as
``dataset[i]``) and the field, since a bad row found at 3 a.m. in round 5 costs a night; the
whole set is validated before a run starts. npd never downloads: a hub name or URL is refused.
"""

from __future__ import annotations

import glob
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from npd_core.errors import DataError, first_line
from npd_core.seeds import seed_for

if TYPE_CHECKING:  # pyarrow is imported where a table is read: a bare GPU box has none
    import pyarrow as pa

ROLES = ("system", "user", "assistant", "tool")
Turn = dict[str, str]  # {"role": ..., "content": ...}
# the field names read by default (``data.prompt_field`` etc. default to them)
PROMPT_FIELD, ANSWER_FIELD, ID_FIELD = "prompt", "answer", "id"
# a hub dataset name (owner/name): refused with a hint when no local path of that name exists
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SHARDS = (".parquet", ".jsonl")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str | tuple[Turn, ...]  # a plain prompt, or the conversation's turns up to the answer
    answer: str | None = None

    @property
    def text(self) -> str:
        """The prompt as one string (the ``prompts`` table, overlap checks): a plain prompt is
        itself, a conversation its turns as JSON."""
        if isinstance(self.prompt, str):
            return self.prompt
        return json.dumps(list(self.prompt), ensure_ascii=False)


class FieldNames(Protocol):
    """The field names a prompt set is read with (``DataConfig`` has them)."""

    prompt_field: str
    answer_field: str
    id_field: str


@dataclass(frozen=True)
class _Fields:
    prompt: str
    answer: str
    id: str


def read_prompts(
    path: str | Path,
    *,
    prompt_field: str = PROMPT_FIELD,
    answer_field: str = ANSWER_FIELD,
    id_field: str = ID_FIELD,
    split: str | None = None,
) -> list[Prompt]:
    """Read and validate every prompt of ``path``: a JSONL or Parquet file, a glob of them (read
    in sorted path order), a folder of such shards, or a ``save_to_disk`` folder (``split``
    picks one of a ``DatasetDict``'s splits). Ids must be unique across the whole set; a row
    without one gets ``<file stem>-<line or row>``. A conversation's trailing assistant turn is
    left out of the prompt and is the answer when the row has none."""
    fields = _Fields(prompt_field, answer_field, id_field)
    out: list[Prompt] = []
    first: dict[str, str] = {}
    for source in _sources(str(path)):
        for where, default_id, row in _rows(source, fields, split):
            p = _prompt(row, where, default_id, fields)
            if p.id in first:
                raise DataError(
                    f"{where}: duplicate id {p.id!r} (also at {first[p.id]}); ids must be "
                    f"unique across the whole prompt set (field '{id_field}')"
                )
            first[p.id] = where
            out.append(p)
    if not out:
        raise DataError(
            f"{path}: no prompts in it; add rows with a '{prompt_field}' string or a list "
            "of {role, content} turns"
        )
    return out


def reads_as_is(path: str | Path, data: FieldNames) -> bool:
    """Whether ``read_prompts(path)`` with the default options reads what ``data``'s options
    read: one JSONL file and the default field names. Any other set is copied into a run as
    ``write_prompts`` writes it, so that every stage reads it with the defaults."""
    p = Path(path)
    given = (data.prompt_field, data.answer_field, data.id_field)
    same = given == (PROMPT_FIELD, ANSWER_FIELD, ID_FIELD)
    return same and not glob.has_magic(str(path)) and p.is_file() and not _is_parquet(p)


# ---------------------------------------------------------------------------------- sources


def _sources(path: str) -> list[Path]:
    """The files (or ``save_to_disk`` folders) that make up ``path``, in reading order."""
    p = Path(path)
    if "://" in path or (not p.exists() and not p.is_absolute() and HUB_NAME.fullmatch(path)):
        fix = (
            "download it and point at the file"
            if "://" in path
            else "to use a hub dataset, save it locally first "
            f"(datasets.load_dataset({path!r}).save_to_disk(DIR)) and point at DIR"
        )
        raise DataError(
            f"{path}: not a local file or folder (relative paths are read from the config's "
            f"folder); npd never downloads: {fix}"
        )
    if glob.has_magic(path):
        found = sorted(glob.glob(path, recursive=True))
        if not found:
            raise DataError(f"{path}: no file matches this glob; check the pattern")
        return [Path(f) for f in found]
    if p.is_dir():
        if _saved_dataset(p):
            return [p]
        shards = sorted(f for f in p.rglob("*") if f.suffix in _SHARDS and f.is_file())
        if not shards:
            raise DataError(
                f"{p}: folder holds no .parquet or .jsonl shards and is not a datasets "
                "save_to_disk folder (no state.json / dataset_dict.json)"
            )
        return shards
    if not p.is_file():
        raise DataError(
            f"{p}: prompts file not found; give a JSONL or Parquet file, a folder of shards "
            "or a datasets save_to_disk folder"
        )
    return [p]


def _saved_dataset(p: Path) -> bool:
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _is_parquet(p: Path) -> bool:
    if p.suffix == ".parquet":
        return True
    with open(p, "rb") as f:
        return f.read(4) == b"PAR1"


def _rows(
    source: Path, fields: _Fields, split: str | None
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, default id, row) of each row of one source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if source.is_dir():
        table = _load_saved(source, split)
    elif _is_parquet(source):
        try:
            table = pq.read_table(source)
        except (pa.ArrowException, OSError) as err:
            raise DataError(
                f"{source}: not a Parquet file ({first_line(err)}); write it with "
                "pyarrow/pandas/datasets to_parquet, or give JSONL a .jsonl name"
            ) from None
    else:
        yield from _jsonl_rows(source)
        return
    _check_columns(source, table.schema, fields)
    stem = source.name if source.is_dir() else source.stem
    for i, row in enumerate(table.to_pylist()):
        yield f"{source}: row {i}", f"{stem}-{i}", row


def _load_saved(source: Path, split: str | None) -> pa.Table:
    """The Arrow table of a ``save_to_disk`` folder (one split of a ``DatasetDict``)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(str(source))
    except Exception as err:  # datasets raises its own and builtin types for a broken folder
        raise DataError(
            f"{source}: cannot load this save_to_disk folder ({first_line(err)})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in ds:
            given = "no data.split is set" if split is None else f"data.split is {split!r}"
            raise DataError(
                f"{source}: a datasets folder with splits {', '.join(names)} and {given}; "
                f"set data.split to one of them, or point at its folder ({source}/<split>)"
            )
        ds = ds[split]
    return ds.with_format("arrow")[:]


def _check_columns(source: Path, schema: pa.Schema, fields: _Fields) -> None:
    """The prompt column a tabular source must have (and the type a conversation column
    needs); answer and id columns are optional, as the fields of a JSONL row are."""
    import pyarrow as pa

    names = schema.names
    if fields.prompt not in names and "messages" not in names:
        raise DataError(
            f"{source}: no column '{fields.prompt}' or 'messages' (columns: "
            f"{', '.join(names)}); set data.prompt_field to the prompt's column"
        )
    if "messages" in names and fields.prompt not in names:
        kind = schema.field("messages").type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
            raise DataError(
                f"{source}: column 'messages' holds {kind}, not a list of turns; store each "
                "row as a list of {role, content} structs (json.loads a JSON string first)"
            )


def _jsonl_rows(p: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text; re-encode the file as UTF-8") from None
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
        yield f"{p}:{n}", f"{p.stem}-{n}", row


# ---------------------------------------------------------------------------------- rows


def _prompt(row: dict[str, Any], where: str, default_id: str, fields: _Fields) -> Prompt:
    """One validated prompt of a row (``where`` names its file and line or row)."""
    key = fields.prompt if fields.prompt in row or "messages" not in row else "messages"
    value = row.get(key)
    reference = None
    if isinstance(value, list):
        prompt, reference = _conversation(value, f"{where}: field '{key}'")
    elif isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty '{key}'; remove the row or fill it in")
        if _turns_as_json(value):
            raise DataError(
                f"{where}: field '{key}' is a JSON string of turns; store it as a list of "
                "{role, content} objects (json.loads it before saving)"
            )
        prompt = value
    else:
        raise DataError(
            f"{where}: missing or non-string '{key}' field; give a string or a list of "
            f"{{role, content}} turns (data.prompt_field names the field), got "
            f"{type(value).__name__}"
        )
    pid = row.get(fields.id)
    if pid is None:
        pid = default_id
    elif not isinstance(pid, str | int) or isinstance(pid, bool):
        raise DataError(f"{where}: '{fields.id}' must be a string or integer")
    answer = row.get(fields.answer)
    if answer is None:
        answer = reference
    elif isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    elif not isinstance(answer, str):
        raise DataError(
            f"{where}: '{fields.answer}' must be a string or a number, got {type(answer).__name__}"
        )
    return Prompt(str(pid), prompt, answer)


def _conversation(turns: list[Any], where: str) -> tuple[tuple[Turn, ...], str | None]:
    """The turns of a conversation up to its trailing assistant turn, and that turn's text."""
    if not turns:
        raise DataError(f"{where}: empty list of turns; give at least one user turn")
    out = []
    for i, t in enumerate(turns):
        at = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise DataError(f"{at}: a turn must be an object with 'role' and 'content'")
        role, content = t.get("role"), t.get("content")
        if not isinstance(role, str):
            raise DataError(f"{at}: turn without a string 'role'; give one of {', '.join(ROLES)}")
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            shown = "null" if content is None else type(content).__name__
            raise DataError(f"{at}: 'content' of a {role} turn is {shown}; give its text")
        out.append({"role": role, "content": content})
    reference = out.pop()["content"] if out[-1]["role"] == "assistant" else None
    if not any(t["role"] == "user" for t in out):
        raise DataError(f"{where}: no user turn before the answer; add the user's question")
    return tuple(out), reference


def _turns_as_json(value: str) -> bool:
    """Whether a prompt string is a conversation saved as JSON text (a common export slip)."""
    if not value.lstrip().startswith("[") or '"role"' not in value:
        return False
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return False
    return isinstance(parsed, list) and all(isinstance(t, dict) and "role" in t for t in parsed)


# ---------------------------------------------------------------------------------- sets


def shared_prompts(train: list[Prompt], held_out: list[Prompt]) -> list[str]:
    """Ids of the held-out prompts whose text (``Prompt.text``, exact) is also a train prompt."""
    seen = {p.text for p in train}
    return [p.id for p in held_out if p.text in seen]


def write_prompts(path: str | Path, prompts: list[Prompt]) -> None:
    """npd's own JSONL (``id``, ``prompt`` as a string or a list of turns, ``answer``), which
    ``read_prompts`` reads back with the default options."""
    with open(path, "w", encoding="utf-8") as f:
        for q in prompts:
            prompt = q.prompt if isinstance(q.prompt, str) else list(q.prompt)
            row: dict[str, Any] = {"id": q.id, "prompt": prompt}
            if q.answer is not None:
                row["answer"] = q.answer
            f.write(json.dumps(row) + "\n")


def round_prompts(prompts: list[Prompt], n: int, seed: int, round_: int) -> list[Prompt]:
    """The prompts of one round: a seeded sample without replacement (cycling if n > len)."""
    rng = random.Random(seed_for(seed, "prompts", round_))
    if n >= len(prompts):
        return prompts[:]
    return rng.sample(prompts, n)
