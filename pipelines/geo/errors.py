"""The geo package's errors: one line each, reported by a command without a traceback."""

from __future__ import annotations

from pipelines.errors import PipelineError


class GeoError(PipelineError):
    """A footprint or hit that cannot be written as a geometry (not finite, off the globe, invalid)."""


class GeoFilterError(GeoError):
    """A malformed geo or time filter; the message names the flag and the reason."""
