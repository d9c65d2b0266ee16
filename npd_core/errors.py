"""User-facing errors. Each message is one line naming the file/field/value and what to do.

The CLI prints ``error: <message>`` and exits non-zero (2 for config/usage errors); anything else
that escapes is a bug and shows a traceback only with ``--debug``.
"""


class NPDError(Exception):
    """A problem the user can fix; ``exit_code`` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # one line, whatever a wrapped library message contained
        super().__init__(" ".join(str(message).split()))


class ConfigError(NPDError):
    """Bad config file, key or value."""

    exit_code = 2


class DataError(NPDError):
    """Bad prompts file or row."""

    exit_code = 2


class ModelError(NPDError):
    """Missing or unusable checkpoint/tokenizer."""

    exit_code = 2


class StoreError(NPDError):
    """The output directory or its DuckDB store cannot be used as asked."""


class TrainingError(NPDError):
    """A round could not train (e.g. a non-finite loss); the last good checkpoint is kept."""
