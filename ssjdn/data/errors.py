"""Errors raised on bad data. Every message names the file (and the line or record) and the reason."""

from __future__ import annotations


class DataError(ValueError):
    """Base class for problems with input data (as opposed to bugs or environment failures)."""


class DatasetFormatError(DataError):
    """A dataset description file is unusable: malformed, ambiguous, or unsafe (e.g. a path escaping the root)."""


class ImageDecodeError(DataError):
    """An image file cannot be decoded: empty, truncated, not an image, too large, or an unsupported layout."""


class NoDatasetDescriptionError(DatasetFormatError):
    """A folder holds no dataset description at all (no Karpathy JSON, precomp files or table): not a dataset."""
