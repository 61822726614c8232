"""Where a training run lives: `STORAGE_URL/RUN_NAME/` on any fsspec URL (local path, `s3://` on any endpoint).

    checkpoint-e0002-s0000104/   Ray Train checkpoints (checkpoint.pt + state.json); the newest few are kept
    checkpoint_manager_snapshot.json   Ray's index of them (what `--resume auto` continues from)
    run.json        identity of the run: config, dataset fingerprint, shards URL (written before any worker starts)
    metrics.jsonl   one line per finished epoch (epoch 0 = the untrained model)
    best/           checkpoint.pt + metrics.json of the best validation mR so far
    progress.json   live: attempt, epoch, step, workers (pid, node); rewritten every few steps
    attempts.jsonl  one line per start of the worker group (what it resumed from)
    plan/epoch-NNNN.json   which shards each rank read in that epoch, samples seen, bad samples
    bad_samples.jsonl      samples skipped because they could not be read or decoded
    fatal.json      a failure that retrying cannot fix (NaN loss, too many bad samples); see pipelines.train
    summary.json    written by the driver when the run ends

Every file is written atomically (temporary name, then commit); S3 objects only appear once complete.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import urlparse

from fsspec.utils import get_protocol

from pipelines.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    full_url,
    get_fs,
    read_json,
    safe_join,
    with_retries,
)

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_name(name: str) -> str:
    if not _NAME_OK.match(name) or ".." in name:
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, no '..')")
    return name


def default_run_name(config_name: str, dataset_name: str) -> str:
    """Stable across invocations (Ray Train resumes only under the same name): `ssjdn-CONFIG-DATASET`."""
    raw = f"ssjdn-{config_name}-{dataset_name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")[:128]


def run_url(storage_url: str, name: str) -> str:
    fs, root = get_fs(storage_url)
    return full_url(fs, safe_join(root, check_run_name(name)))


def _s3_endpoint(storage_options: dict[str, Any]) -> str | None:
    return (
        storage_options.get("endpoint_url")
        or (storage_options.get("client_kwargs") or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def ray_storage(storage_url: str, storage_options: dict[str, Any] | None = None):
    """`(storage_path, storage_filesystem)` for `ray.train.RunConfig`.

    `s3://` gets an explicit `pyarrow.fs.S3FileSystem` with the endpoint of the options or the AWS variables
    (pyarrow's own S3FileSystem() ignores AWS_ENDPOINT_URL, see PITFALLS); credentials stay with the
    standard AWS chain of each process. Local paths become absolute. Other schemes go through fsspec.
    """
    import pyarrow.fs as pafs

    opts = dict(storage_options or {})
    proto = get_protocol(storage_url)
    if proto == "file":
        return os.path.abspath(storage_url.removeprefix("file://")), None
    if proto in ("s3", "s3a"):
        kwargs: dict[str, Any] = {}
        endpoint = _s3_endpoint(opts)
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "https"
        region = (
            opts.get("client_kwargs", {}).get("region_name")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )
        if region:
            kwargs["region"] = region
        if opts.get("key") and opts.get("secret"):
            kwargs.update(access_key=opts["key"], secret_key=opts["secret"])
        if opts.get("anon"):
            kwargs["anonymous"] = True
        path = storage_url.split("://", 1)[1].rstrip("/")
        return path, pafs.S3FileSystem(**kwargs)
    fs, path = get_fs(storage_url, opts)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


class RunDir:
    """Small JSON files of a run directory, read and written through fsspec with retries."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = get_fs(url, self.storage_options)

    def path(self, rel: str) -> str:
        return safe_join(self.root, rel)

    def url_of(self, rel: str) -> str:
        return full_url(self.fs, self.path(rel))

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return with_retries(lambda: self.fs.exists(self.path(rel)), what=f"check {self.url_of(rel)}")

    def read_json(self, rel: str) -> Any | None:
        self.fs.invalidate_cache()
        return with_retries(lambda: read_json(self.fs, self.path(rel)), what=f"read {self.url_of(rel)}")

    def write_json(self, rel: str, obj: Any) -> None:
        with_retries(
            lambda: atomic_write_json(self.fs, self.path(rel), obj), what=f"write {self.url_of(rel)}"
        )

    def write_bytes(self, rel: str, data: bytes) -> None:
        with_retries(
            lambda: atomic_write_bytes(self.fs, self.path(rel), data), what=f"write {self.url_of(rel)}"
        )

    def read_jsonl(self, rel: str) -> list[dict[str, Any]]:
        self.fs.invalidate_cache()

        def read() -> list[dict[str, Any]]:
            try:
                with self.fs.open(self.path(rel), "rb") as f:
                    text = f.read().decode("utf-8")
            except FileNotFoundError:
                return []
            return [json.loads(line) for line in text.splitlines() if line.strip()]

        return with_retries(read, what=f"read {self.url_of(rel)}")

    def write_jsonl(self, rel: str, rows: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")
        self.write_bytes(rel, data)

    def append_jsonl(self, rel: str, row: dict[str, Any]) -> None:
        """Object stores cannot append: read, add, rewrite atomically (these files stay small)."""
        self.write_jsonl(rel, [*self.read_jsonl(rel), row])

    def move(self, src: str, dst: str) -> None:
        def mv() -> None:
            self.fs.copy(self.path(src), self.path(dst))
            self.fs.rm(self.path(src))

        with_retries(mv, what=f"move {self.url_of(src)}")

    def checkpoints(self) -> list[str]:
        """Names of the checkpoint folders present, oldest first (names sort by epoch and step)."""
        self.fs.invalidate_cache()
        try:
            entries = with_retries(lambda: self.fs.ls(self.root, detail=False), what=f"list {self.url}")
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if n.startswith("checkpoint-e"))


def checkpoint_dir_name(epoch_done: int, step: int, mid_epoch: bool) -> str:
    """Sortable and unique per report: `checkpoint-e0002-s0000104` (`-m` when taken inside an epoch)."""
    return f"checkpoint-e{epoch_done:04d}-s{step:07d}" + ("-m" if mid_epoch else "")
