"""The options of a tiling run, written once: `ssjdn tile`'s flags, the Python API and the flow's parameters are
all built from `TileOptions` (chip geometry, resolution, bands, value scaling, nodata limit, encoding, running).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from pipelines.cli_types import comma_list, fraction, positive_int
from pipelines.errors import PipelineError
from pipelines.fsio import parse_storage_options
from pipelines.options import option
from pipelines.shard.options import RAY_HELP, check_ray_address
from pipelines.tile.rio import GDAL_CACHE_MB

ENCODINGS = {"png": "PNG", "jpg": "JPEG"}
RESAMPLING = ("nearest", "average", "bilinear", "cubic", "lanczos", "mode")
SCALE_METHODS = ("auto", "none", "fixed", "percentile")
DEFAULT_PERCENTILES = (2.0, 98.0)


class TileOptionsError(PipelineError, ValueError):
    """An option value that cannot work (named, with the accepted values)."""


@dataclass(frozen=True)
class Scaling:
    """How pixel values become 8-bit: `none` (uint8 data as is), `fixed` (one range for every scene) or
    `percentile` (per scene and band, from an overview). `auto`: none for uint8, percentile 2-98 otherwise."""

    method: str = "auto"
    low: float | None = None  # fixed: the value that becomes 0; percentile: the lower percentile
    high: float | None = None

    @classmethod
    def parse(cls, text: str) -> Scaling:
        """`auto`, `none`, `fixed:MIN,MAX` (or just `MIN,MAX`), `percentile:LO,HI` (or `pLO,HI`)."""
        text = text.strip().lower()
        if text in ("auto", "none"):
            return cls(text)
        method, _, rest = text.partition(":")
        if not rest:
            method, rest = ("percentile", text[1:]) if text.startswith("p") else ("fixed", text)
        if method not in ("fixed", "percentile"):
            raise TileOptionsError(
                f"--scale {text!r}: expected auto, none, fixed:MIN,MAX or percentile:LO,HI"
            )
        try:
            low, high = (float(v) for v in rest.split(","))
        except ValueError:
            raise TileOptionsError(f"--scale {text!r}: expected two numbers, e.g. {method}:0,10000") from None
        return cls(method, low, high)

    def __post_init__(self) -> None:
        if self.method not in SCALE_METHODS:
            raise TileOptionsError(
                f"scale method {self.method!r}: expected one of {', '.join(SCALE_METHODS)}"
            )
        if self.method in ("fixed", "percentile"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise TileOptionsError(
                    f"--scale {self.method}: needs LOW < HIGH (got {self.low}, {self.high})"
                )
        if self.method == "percentile" and not 0 <= self.low < self.high <= 100:
            raise TileOptionsError(
                f"--scale percentile:{self.low},{self.high}: percentiles lie within [0, 100]"
            )

    def for_dtype(self, dtype: str) -> Scaling:
        """The method that applies to a scene of `dtype` (resolves `auto`)."""
        if self.method != "auto":
            return self
        return Scaling("none") if dtype == "uint8" else Scaling("percentile", *DEFAULT_PERCENTILES)

    def spec(self) -> str:
        if self.method in ("auto", "none"):
            return self.method
        return f"{self.method}:{self.low:g},{self.high:g}"


def parse_bands(text: str | None) -> tuple[int | str, ...] | None:
    """`4,3,2` -> (4, 3, 2); `red,green,blue` -> names (STAC band names, GDAL band descriptions)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise TileOptionsError("--bands: expected a comma-separated list such as 4,3,2 or red,green,blue")
    out: list[int | str] = []
    for p in parts:
        if p.isdigit():
            if int(p) < 1:
                raise TileOptionsError(f"--bands {text}: band indexes start at 1")
            out.append(int(p))
        else:
            out.append(p)
    return tuple(out)


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


@dataclass(frozen=True)
class TileOptions:
    """Options of a tiling run (docs/tiling.md). The first group decides the chips' bytes (`output_options`)."""

    chip_size: int = option(256, type=positive_int, help="chip side in output pixels (default 256)")
    stride: int | None = option(
        None,
        type=positive_int,
        help="output pixels between chip origins (default: the chip size, no overlap)",
    )
    overlap: int | None = option(
        None, type=int, help="output pixels shared by neighbouring chips (= chip size - stride); default 0"
    )
    gsd: float | None = option(
        None,
        type=_positive_float,
        help="target ground sample distance in metres (default: each scene's own); coarser reads come from "
        "the file's overviews, or are decimated while reading",
    )
    bands: str | None = option(
        None,
        help="bands to read: 1-based indexes (4,3,2) or names (red,green,blue: STAC eo:bands / bands, GDAL "
        "descriptions, colour interpretation); 1 or 3 of them (default: RGB, else the first band)",
    )
    assets: tuple[str, ...] | None = option(
        None,
        type=comma_list,
        help="STAC asset keys to read (default: chosen by --bands, else 'visual' or RGB)",
    )
    scale: str = option(
        "auto",
        help="8-bit scaling: auto (none for uint8, else percentile:2,98), none, fixed:MIN,MAX, or "
        "percentile:LO,HI (per scene and band, from an overview; recorded in the manifest)",
    )
    max_nodata: float = option(
        0.5, type=fraction, help="skip (and count) chips with a larger nodata/alpha fraction (default 0.5)"
    )
    encoding: str = option(
        "png", choices=tuple(ENCODINGS), help="chip encoding: png (lossless, default) or jpg"
    )
    jpeg_quality: int = option(95, type=positive_int, help="JPEG quality with --encoding jpg (default 95)")
    resampling: str = option(
        "average", choices=RESAMPLING, help="resampling of decimated reads (default average; masks: nearest)"
    )
    maxcount: int = option(1000, type=positive_int, help="chips per shard at most (default 1000)")
    allow_ungeoreferenced: bool = option(
        False, action="store_true", help="tile rasters without CRS or geotransform as pixel-only chips"
    )
    max_bad_fraction: float = option(
        0.1, type=fraction, help="fail (no manifest) above this fraction of bad chips and scenes (0.1)"
    )
    # Running.
    gdal_cache_mb: int = option(
        GDAL_CACHE_MB, type=positive_int, help=f"GDAL block cache per process, MB (default {GDAL_CACHE_MB})"
    )
    workers: int = option(
        default_factory=_default_workers,
        type=positive_int,
        help="writers: this process plus up to W-1 worker processes (default: min(4, CPUs))",
    )
    ray: str | None = option(None, cli=False, flow=False, help=RAY_HELP)  # `--ray [ADDRESS]`: see cli.py
    ray_resource: str | None = option(
        None,
        metavar="NAME",
        help="with --ray: run jobs only on nodes that offer this custom resource (e.g. the nodes that can "
        "reach the archive)",
    )
    overwrite: bool = option(
        False, action="store_true", help="replace chips written from another source or with other options"
    )
    storage_options: dict[str, Any] = option(
        default_factory=dict,
        flag="--storage-option",
        action="append",
        metavar="KEY=VALUE",
        parse=parse_storage_options,
        help="fsspec storage option for DEST and SOURCE, repeatable (endpoint_url=..., anon=true); S3 "
        "credentials are best left to the standard AWS_* variables",
    )
    retries: int = option(3, type=int, help="retries per shard and scene on storage errors (default 3)")
    retry_backoff: float = option(1.0, type=float, help="first retry delay in s, doubling (default 1)")
    progress: bool = option(
        True, flag="--no-progress", action="store_false", help="no progress bar", flow=False
    )

    def __post_init__(self) -> None:
        if self.bands is not None and not isinstance(self.bands, str):  # Python API: (4, 3, 2)
            object.__setattr__(self, "bands", ",".join(str(b) for b in self.bands))
        if self.assets is not None:
            object.__setattr__(
                self, "assets", tuple([self.assets] if isinstance(self.assets, str) else self.assets) or None
            )
        if self.overlap is not None:
            if self.stride is not None and self.stride != self.chip_size - self.overlap:
                raise TileOptionsError(
                    f"--stride {self.stride} and --overlap {self.overlap} disagree; give one"
                )
            if not 0 <= self.overlap < self.chip_size:
                raise TileOptionsError(f"--overlap {self.overlap}: expected 0..{self.chip_size - 1} pixels")
            object.__setattr__(self, "stride", self.chip_size - self.overlap)
            object.__setattr__(self, "overlap", None)
        try:
            self._check()
        except ValueError as exc:
            if isinstance(exc, TileOptionsError):
                raise
            raise TileOptionsError(str(exc)) from None

    def _check(self) -> None:
        if self.chip_size < 8 or self.chip_size > 8192:
            raise ValueError(f"--chip-size {self.chip_size}: expected 8..8192 pixels")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"--stride {self.stride}: must be >= 1 pixel")
        if self.gsd is not None and not self.gsd > 0:
            raise ValueError(f"--gsd {self.gsd}: must be a positive number of metres")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"--encoding {self.encoding!r}: expected one of {', '.join(ENCODINGS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality {self.jpeg_quality}: expected 1..100")
        if self.resampling not in RESAMPLING:
            raise ValueError(f"--resampling {self.resampling!r}: expected one of {', '.join(RESAMPLING)}")
        if not 0.0 <= self.max_nodata <= 1.0:
            raise ValueError(f"--max-nodata {self.max_nodata}: expected a fraction within [0, 1]")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max-bad-fraction {self.max_bad_fraction}: expected a fraction within [0, 1]")
        if self.maxcount < 1 or self.workers < 1 or self.gdal_cache_mb < 1:
            raise ValueError("--maxcount, --workers and --gdal-cache-mb must be >= 1")
        bands = self.band_list
        if bands is not None and len(bands) not in (1, 3):
            raise ValueError(f"--bands {self.bands}: PNG/JPEG chips hold 1 or 3 bands (got {len(bands)})")
        self.scaling  # noqa: B018 - parses (and so checks) --scale
        check_ray_address(self.ray)

    @property
    def step(self) -> int:
        return self.stride or self.chip_size

    @property
    def band_list(self) -> tuple[int | str, ...] | None:
        return parse_bands(self.bands)

    @property
    def scaling(self) -> Scaling:
        return Scaling.parse(self.scale)

    def output_options(self) -> dict[str, Any]:
        """The options that decide the chips' content (what a destination and each shard's digest are checked
        against). The key names are part of the on-disk format: changing one changes every digest."""
        out: dict[str, Any] = {
            "chip_size": self.chip_size,
            "stride": self.step,
            "gsd": self.gsd,
            "bands": list(self.band_list) if self.bands is not None else None,
            "assets": list(self.assets) if self.assets is not None else None,
            "scale": self.scaling.spec(),
            "max_nodata": self.max_nodata,
            "encoding": self.encoding,
            "resampling": self.resampling,
            "maxcount": self.maxcount,
            "allow_ungeoreferenced": self.allow_ungeoreferenced,
        }
        if self.encoding == "jpg":
            out["jpeg_quality"] = self.jpeg_quality
        return out
