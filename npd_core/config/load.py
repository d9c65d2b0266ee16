"""Reading a config: YAML and overrides in, one ``error:`` line out for any problem; relative
paths resolved against the config file's folder; the commented YAML of ``npd config init``."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from npd_core.config.run import NPDConfig
from npd_core.data import HUB_NAME
from npd_core.errors import ConfigError

PATH_FIELDS = (
    ("models", "teacher"),
    ("models", "student"),
    ("data", "prompts"),
    ("data", "eval_prompts"),
)


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        ann = model.model_fields.get(str(part))
        if ann is None or not isinstance(ann.annotation, type):
            return []
        model = ann.annotation
    return list(model.model_fields)


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _field_names(NPDConfig, loc), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; remove it"
        return f"{source}: unknown key '{field}'{hint}"
    value = e.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: field '{field}': {e['msg']}{shown}; fix it in the config"


def build_config(
    data: dict[str, Any], source: str = "config", base: Path | None = None
) -> NPDConfig:
    """Validate a mapping into an ``NPDConfig``; relative paths resolve against ``base``."""
    try:
        cfg = NPDConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None
    for sec, key in PATH_FIELDS:
        section = getattr(cfg, sec)
        value = getattr(section, key)
        if value:
            setattr(section, key, _resolve(value, f"{sec}.{key}", source, base))
    cfg.eval.sets = {
        name: _resolve(value, f"eval.sets.{name}", source, base)
        for name, value in cfg.eval.sets.items()
    }
    return cfg


def _resolve(value: str, field: str, source: str, base: Path | None) -> str:
    """A path field's value made absolute against ``base`` (the config's folder)."""
    if "\0" in value:  # the OS refuses such a path with a bare ValueError
        raise ConfigError(f"{source}: field '{field}': path contains a NUL byte; fix it")
    if base is None or Path(value).expanduser().is_absolute():
        return value
    if not field.startswith("models.") and _remote(value, base):
        return value  # kept as written: read_prompts refuses it with a hint
    return str((base / value).resolve())


def _remote(value: str, base: Path) -> bool:
    """A URL, or a hub name (owner/name) that is no path next to the config."""
    return "://" in value or (
        HUB_NAME.fullmatch(value) is not None and not os.path.exists(base / value)
    )


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> NPDConfig:
    """Read YAML (or nothing, for the defaults), apply ``overrides`` (nested dict), validate."""
    data: dict[str, Any] = {}
    base = None
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; create one with `npd config init {p}`")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8 YAML") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{p}:{where} invalid YAML ({getattr(err, 'problem', err)})"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
        base = p.resolve().parent
    if overrides:
        data = merge(data, overrides)
    return build_config(data, source, base)


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` with ``b`` laid over it, section by section (nested dicts merge, other values of
    ``b`` replace ``a``'s): how overrides and bench variants change part of a config dump."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def commented_yaml(cfg: NPDConfig | None = None) -> str:
    """The config as YAML with each field's description as a comment (``npd config init``)."""
    cfg = cfg or NPDConfig()
    lines = ["# npd config: every key is optional; omitted keys take these defaults."]

    def emit(model: BaseModel, indent: int) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            pad = " " * indent
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(value, indent + 2)
                continue
            dumped = yaml.safe_dump(value, default_flow_style=True).strip()
            dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{name}: {dumped}  # {field.description}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"
