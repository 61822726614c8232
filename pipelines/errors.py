"""The errors a pipeline command reports as one line (bad input, a failed job), never as a traceback."""

from __future__ import annotations

from ssjdn.config import ConfigError
from ssjdn.data.errors import DataError


class PipelineError(Exception):
    """Bad input or a failed job: the CLI prints str(exc) as one line and exits 1."""


# What a command reports as one line: the pipelines' own errors and the model library's bad-input errors.
# OSError covers a missing or unreadable file the user named (its message names the path).
USER_ERRORS: tuple[type[BaseException], ...] = (PipelineError, DataError, ConfigError, OSError)
