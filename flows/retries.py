"""Retry policy shared by the flows: retry a task only when storage failed (bad data will not heal)."""

from __future__ import annotations

from pipelines.fsio import StorageError, is_storage_error


def retry_on_storage_error(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: True when the task failed on storage (S3 down, timeouts), else False."""
    try:
        state.result()
    except Exception as exc:
        return isinstance(exc, StorageError) or is_storage_error(exc)
    return False
