"""`ServeOptions`: what `ssjdn serve` takes besides the store URL (flags, Python API), with the service's limits."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pipelines.cli_types import positive_int
from pipelines.errors import PipelineError
from pipelines.fsio import parse_storage_options
from pipelines.options import option


class ServeOptionsError(PipelineError, ValueError):
    """An option value or combination the service refuses (named, with what is accepted)."""


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


@dataclass(frozen=True)
class ServeOptions:
    host: str = option(
        "127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs --token-file)"
    )
    port: int = option(8000, type=int, help="port (default 8000; 0 picks a free one)")
    token_file: str | None = option(
        None,
        metavar="PATH",
        help="file holding the API token: every API request must then send `Authorization: Bearer TOKEN`",
    )
    model_id: str | None = option(None, help="store version (model_id or a unique prefix; default: newest)")
    checkpoint: str | None = option(
        None, metavar="URL", help="checkpoint (default: the one the version records)"
    )
    ann: bool = option(
        False,
        action="store_true",
        help="load the version's ANN index (or build one in --cache-dir, in the background) for mode=ann",
    )
    ann_expansion: int | None = option(
        None,
        type=positive_int,
        help="HNSW search width (default the index's, 128): wider finds more of the exact top-k for queries "
        "far from every stored vector (text vs image embeddings), at more time per query",
    )
    cache_dir: str | None = option(
        None,
        metavar="DIR",
        help="local folder for the matrix cache / ANN index the store lacks "
        "(default $SSJDN_CACHE_DIR/searcher or ~/.cache/ssjdn/searcher); nothing is written into the store",
    )
    refresh_s: float = option(
        5.0, type=positive_float, help="seconds between checks for a new store generation (default 5)"
    )
    max_k: int = option(1000, type=positive_int, help="largest k a query may ask for (default 1000)")
    max_text_chars: int = option(
        1000, type=positive_int, help="longest query text in characters (default 1000)"
    )
    max_upload_bytes: int = option(
        10 << 20, type=positive_int, help="largest image upload in bytes (default 10 MiB)"
    )
    max_image_pixels: int = option(
        40_000_000,
        type=positive_int,
        help="largest image (width x height) decoded for a query or a thumbnail (default 40M)",
    )
    max_batch: int = option(
        32, type=positive_int, help="queries answered together when they arrive at once (default 32)"
    )
    storage_options: dict[str, Any] = option(
        default_factory=dict,
        flag="--storage-option",
        action="append",
        metavar="KEY=VALUE",
        parse=parse_storage_options,
        help="fsspec storage option (repeatable)",
    )
    # Limits that have no flag: request bodies other than uploads, and thumbnails passed through as stored.
    max_body_bytes: int = option(64 << 10, help="largest JSON request body", cli=False)
    passthrough_bytes: int = option(4 << 20, help="largest stored image sent without re-encoding", cli=False)
    max_stored_image_bytes: int = option(
        64 << 20, help="largest stored image a thumbnail is made of", cli=False
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServeOptionsError(f"port must be within 0..65535 (got {self.port})")
