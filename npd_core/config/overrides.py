"""Command-line overrides as torchtune and nanoGPT users write them: ``train.lr=2e-5``."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from npd_core.config.run import NPDConfig
from npd_core.errors import ConfigError


def parse_overrides(pairs: list[str], **options: Any) -> dict[str, Any]:
    """``section.key=value`` pairs (values read as YAML), then the command's own options that
    are set, as the nested dict ``load_config`` lays over the config file; an unknown key is a
    one-line error naming it."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not (eq and key):
            raise ConfigError(f"{pair!r}: an override is key=value, e.g. train.lr=2e-5")
        *path, last = key.split(".")
        model: Any = NPDConfig
        for i, part in enumerate(key.split(".")):
            if model is not None and part not in model.model_fields:
                raise ConfigError(
                    f"{pair}: unknown config key {'.'.join(key.split('.')[: i + 1])!r}; "
                    "`npd config show` lists the keys"
                )
            field = model.model_fields[part].annotation if model is not None else None
            model = field if isinstance(field, type) and issubclass(field, BaseModel) else None
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return out | {k: v for k, v in options.items() if v is not None}
