"""Run configuration: one pydantic model per section; every field has a description and a range.

The CLI only fills this in. ``load_config`` turns any validation problem into one line that names
the file, the field and the fix; relative paths are resolved against the config file's folder.
Modules: ``base`` (what sections share), ``stages`` (the producing stages' sections), ``train``
(the learner's), ``run`` (the rest and ``NPDConfig``), ``load`` (YAML in, errors out).
"""

from npd_core.config.base import (
    DEFAULT_EVAL_SET,
    RAY_EXTRA,
    SET_NAME,
    Attention,
    MemoryGB,
    Section,
    deprecated,
)
from npd_core.config.load import (
    PATH_FIELDS,
    build_config,
    commented_yaml,
    load_config,
    merge,
)
from npd_core.config.run import (
    EvalConfig,
    MlflowConfig,
    NPDConfig,
    OrchestrationConfig,
    ScheduleConfig,
    config_digest,
)
from npd_core.config.stages import (
    DataConfig,
    FilterConfig,
    GenerateConfig,
    ModelsConfig,
    PackConfig,
    ScoreConfig,
)
from npd_core.config.train import TrainConfig

__all__ = [
    "DEFAULT_EVAL_SET",
    "PATH_FIELDS",
    "RAY_EXTRA",
    "SET_NAME",
    "Attention",
    "DataConfig",
    "EvalConfig",
    "FilterConfig",
    "GenerateConfig",
    "MemoryGB",
    "MlflowConfig",
    "ModelsConfig",
    "NPDConfig",
    "OrchestrationConfig",
    "PackConfig",
    "ScheduleConfig",
    "ScoreConfig",
    "Section",
    "TrainConfig",
    "build_config",
    "commented_yaml",
    "config_digest",
    "deprecated",
    "load_config",
    "merge",
]
