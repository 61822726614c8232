"""The options of an embedding run, written once: `ssjdn embed`'s flags, `embed_archive`'s keywords and the
`reindex-archive` flow's parameters are all `EmbedOptions`' fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.cli_types import comma_list, positive_int
from pipelines.embed.sources import DEFAULT_CHUNK
from pipelines.errors import PipelineError
from pipelines.fsio import parse_storage_options
from pipelines.options import option
from pipelines.store.schema import DTYPES


class EmbedOptionsError(PipelineError, ValueError):
    """An option value that cannot work (named, with the accepted values)."""


@dataclass(frozen=True)
class EmbedOptions:
    captions: bool = option(False, action="store_true", help="also embed the captions (second table)")
    batch_size: int = option(64, type=positive_int, help="images per encoder batch (default 64)")
    concurrency: int = option(1, type=positive_int, help="encoder actors (default 1)")
    gpu: bool = option(False, action="store_true", help="one GPU per encoder actor")
    dtype: str = option("float32", choices=tuple(DTYPES), help="stored embedding type")
    splits: tuple[str, ...] | None = option(
        None, type=comma_list, help="comma-separated splits to embed (default: all)"
    )
    threads_per_actor: int | None = option(
        None, flag="--threads", type=positive_int, help="torch threads per CPU actor (default: cores/C)"
    )
    max_rows_per_file: int | None = option(
        None, type=positive_int, help="rows per Parquet file (default 50000)"
    )
    commit_every_s: float = option(
        30.0, flag="--commit-every", type=float, metavar="S", help="commit finished units every S s"
    )
    build_ann: bool = option(
        False, flag="--ann", action="store_true", help="(re)build the ANN index of the version afterwards"
    )
    follow_symlinks: bool = option(
        False,
        action="store_true",
        help="read local files through symbolic links that lead out of the archive (default: refuse them)",
    )
    ray_address: str | None = option(None, help="Ray cluster to use (default: RAY_ADDRESS or a local Ray)")
    storage_options: dict[str, Any] = option(
        default_factory=dict,
        flag="--storage-option",
        action="append",
        metavar="KEY=VALUE",
        parse=parse_storage_options,
        help="fsspec storage option for archive, store and checkpoint (repeatable)",
    )
    # Storage options of the store when they differ from the archive's (Python API only).
    store_options: dict[str, Any] | None = option(None, cli=False, flow=False, help="store's storage options")
    chunk_size: int = option(DEFAULT_CHUNK, cli=False, help="samples per unit of a non-shard archive")
    progress: bool = option(
        True, flag="--no-progress", action="store_false", help="no progress bars", flow=False
    )

    def __post_init__(self) -> None:
        if self.splits is not None:
            object.__setattr__(self, "splits", tuple(self.splits) or None)
        if self.dtype not in DTYPES:
            raise EmbedOptionsError(f"--dtype {self.dtype!r} must be one of {', '.join(DTYPES)}")
        if self.batch_size < 1 or self.concurrency < 1:
            raise EmbedOptionsError(
                f"batch_size and concurrency must be >= 1 (got {self.batch_size}, {self.concurrency})"
            )
