"""One chip: a windowed (and, below native resolution, decimated) read, its valid-pixel fraction, 8-bit scaling,
PNG/JPEG encoding, and the json member that says where it lies.

Memory per chip is the chip itself (bands x chip_size^2 values, a few MB at most) plus GDAL's capped block
cache: never a whole scene. A decimated read goes through `out_shape`, so GDAL reads from the overview that
fits (or decimates while reading), never a full-resolution window shrunk afterwards.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from pipelines.tile.footprint import chip_footprint
from pipelines.tile.options import ENCODINGS, TileOptions
from pipelines.tile.scene import OpenScene, valid_mask
from ssjdn.data.errors import DataError

# Item properties that are also copied to the top level of each chip's json (all of them are under "properties").
TOP_LEVEL_PROPERTIES = (
    "datetime",
    "start_datetime",
    "end_datetime",
    "platform",
    "constellation",
    "instruments",
    "eo:cloud_cover",
    "gsd",
)


class ChipSkipped(Exception):
    """Not an error: the chip holds too little data (nodata/alpha) and is counted, not written."""

    def __init__(self, nodata_fraction: float) -> None:
        super().__init__(f"nodata fraction {nodata_fraction:.3f}")
        self.nodata_fraction = nodata_fraction


class ChipReadError(DataError):
    """Reading this chip's window failed on the data (a corrupted tile): the chip is quarantined."""


def _affine(values):
    from rasterio.transform import Affine

    return Affine(*values[:6])


class SceneChips:
    """Reads, scales and encodes the chips of one scene (inside a `with` block that keeps its files open)."""

    def __init__(
        self, scene: dict[str, Any], options: TileOptions, storage_options=None, dataset: str = ""
    ) -> None:
        self.scene = scene
        self.options = options
        self.dataset = dataset
        self._files = OpenScene([a["href"] for a in scene["assets"]], storage_options)
        self.transform = _affine(scene["transform"])
        self.crs = None
        self._base = _base_fields(scene, options, dataset)

    def __enter__(self) -> SceneChips:
        from rasterio.crs import CRS

        self._files.__enter__()
        if self.scene["crs"]:
            self.crs = CRS.from_user_input(self.scene["crs"])
        return self

    def __exit__(self, *exc) -> None:
        self._files.__exit__(*exc)

    @property
    def datasets(self):
        return self._files.datasets

    # ------------------------------------------------------------------------------------------ pixels

    def read(self, row_off: int, col_off: int) -> tuple[np.ndarray, np.ndarray]:
        """(bands x chip x chip raw values, chip x chip valid) for the chip at (row_off, col_off), padded with
        invalid pixels where the window extends past the scene. Raises ChipReadError on a failed read."""
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        s, chip = self.scene, self.options.chip_size
        size = s["src_size"]
        c1, r1 = min(col_off + size, s["width"]), min(row_off + size, s["height"])
        ow = chip if c1 - col_off == size else max(1, round((c1 - col_off) * chip / size))
        oh = chip if r1 - row_off == size else max(1, round((r1 - row_off) * chip / size))
        window = Window(col_off, row_off, c1 - col_off, r1 - row_off)
        resampling = Resampling.nearest if size == chip else Resampling[self.options.resampling]
        try:
            data = self._read_bands(window, (oh, ow), resampling)
            valid = valid_mask(s, self.datasets, data, window, (oh, ow))
        except RasterioIOError as exc:
            raise ChipReadError(gdal_reason(exc)) from exc
        if (oh, ow) != (chip, chip):
            full = np.zeros((data.shape[0], chip, chip), dtype=data.dtype)
            full[:, :oh, :ow] = data
            mask = np.zeros((chip, chip), dtype=bool)
            mask[:oh, :ow] = valid
            data, valid = full, mask
        return data, valid

    def _read_bands(self, window, shape, resampling) -> np.ndarray:
        s = self.scene
        groups: dict[int, list[int]] = {}
        for b in s["bands"]:
            groups.setdefault(b["asset"], []).append(b["index"])
        if len(groups) == 1:  # the common case: one read call for all bands
            ((asset, indexes),) = groups.items()
            return self.datasets[asset].read(
                indexes, window=window, out_shape=(len(indexes), *shape), resampling=resampling
            )
        out = []
        for b in s["bands"]:
            ds = self.datasets[b["asset"]]
            win = (
                window
                if b["asset"] == 0 or s["grids"][b["asset"]] == s["grids"][0]
                else self._window_in(ds, window)
            )
            out.append(ds.read(b["index"], window=win, out_shape=shape, resampling=resampling))
        return np.stack(out)

    def _window_in(self, ds, window):
        """The same ground area in another asset's pixel grid (bands of different resolutions)."""
        from rasterio.windows import bounds, from_bounds

        return from_bounds(*bounds(window, self.transform), transform=ds.transform)

    # ------------------------------------------------------------------------------------------ output

    def to_uint8(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        scaling = self.scene["scaling"]
        if scaling["method"] == "none":
            out = data.astype(np.uint8, copy=False)
        else:
            out = np.empty(data.shape, dtype=np.uint8)
            for i, band in enumerate(data):
                lo, hi = scaling["low"][i], scaling["high"][i]
                if lo is None:  # the survey found no valid pixel in this band
                    out[i] = 0
                    continue
                scaled = (band.astype(np.float32) - lo) * (255.0 / (hi - lo)) + 0.5
                np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255, out=scaled)
                out[i] = scaled.astype(np.uint8)
        if not valid.all():
            out = np.where(valid, out, 0).astype(np.uint8)
        return out

    def encode(self, pixels: np.ndarray) -> tuple[bytes, str]:
        """(image bytes, PIL mode)."""
        from PIL import Image

        if pixels.shape[0] == 1:
            img = Image.fromarray(pixels[0], mode="L")
        else:
            img = Image.fromarray(np.ascontiguousarray(np.moveaxis(pixels, 0, -1)), mode="RGB")
        buf = io.BytesIO()
        if self.options.encoding == "jpg":
            img.save(buf, format="JPEG", quality=self.options.jpeg_quality)
        else:
            img.save(buf, format="PNG")
        return buf.getvalue(), img.mode

    def metadata(self, key: str, row_off: int, col_off: int) -> dict[str, Any]:
        """The chip's json member (see docs/tiling.md); raises FootprintError when it cannot be placed."""
        s, chip = self.scene, self.options.chip_size
        size = s["src_size"]
        window = {"col_off": col_off, "row_off": row_off, "width": size, "height": size}
        doc = {**self._base, "key": key, "window": window}
        if not s["georeferenced"]:
            return {
                **doc,
                "transform": None,
                "bounds": None,
                "footprint": None,
                "bbox": None,
                "centroid": None,
                "lon": None,
                "lat": None,
            }
        t = self.transform
        chip_t = t @ _translation_scale(col_off, row_off, size / chip)
        corners = [
            t @ (c, r)
            for c, r in (
                (col_off, row_off),
                (col_off + size, row_off),
                (col_off + size, row_off + size),
                (col_off, row_off + size),
            )
        ]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        place = chip_footprint(self.crs, t, col_off, row_off, size, size)
        return {
            **doc,
            "transform": [chip_t.a, chip_t.b, chip_t.c, chip_t.d, chip_t.e, chip_t.f],
            "bounds": [min(xs), min(ys), max(xs), max(ys)],
            **place,
            "lon": place["centroid"][0],
            "lat": place["centroid"][1],
        }

    def prepare(self, key: str, row_off: int, col_off: int) -> tuple[np.ndarray, dict[str, Any], int]:
        """(8-bit pixels, json doc without the image fields, raw bytes read): the GDAL part of a chip, which must
        stay in the thread that opened the scene. Raises ChipSkipped, ChipReadError, FootprintError."""
        data, valid = self.read(row_off, col_off)
        nodata = 1.0 - float(valid.mean())
        if nodata > self.options.max_nodata or not valid.any():
            raise ChipSkipped(nodata)
        doc = self.metadata(key, row_off, col_off)  # before encoding: an unplaceable chip costs no PNG
        doc["nodata_fraction"] = round(nodata, 6)
        return self.to_uint8(data, valid), doc, data.nbytes

    def finish(self, key: str, pixels: np.ndarray, doc: dict[str, Any]) -> dict[str, bytes]:
        """The chip's tar members: the encoded image and the json. No GDAL: safe in any thread (Pillow
        encodes without holding the GIL)."""
        image, mode = self.encode(pixels)
        doc = {**doc, "mode": mode}
        body = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return {"__key__": key, self.options.encoding: image, "json": body.encode()}

    def chip_members(
        self, key: str, row_off: int, col_off: int
    ) -> tuple[dict[str, bytes], dict[str, Any], int]:
        """(tar members, json doc, raw bytes read) of one chip; raises ChipSkipped, ChipReadError, FootprintError."""
        pixels, doc, nbytes = self.prepare(key, row_off, col_off)
        members = self.finish(key, pixels, doc)
        return members, json.loads(members["json"]), nbytes


def gdal_reason(exc: BaseException) -> str:
    """rasterio's message plus GDAL's own (the chained CPLE error says which block failed and why)."""
    parts = [f"{type(exc).__name__}: {exc}"]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in parts[0]:
        parts.append(str(cause))
    return " ".join("; ".join(parts).split())


def _translation_scale(col_off: float, row_off: float, scale: float):
    from rasterio.transform import Affine

    return Affine.translation(col_off, row_off) @ Affine.scale(scale)


def _base_fields(scene: dict[str, Any], options: TileOptions, dataset: str) -> dict[str, Any]:
    """The json fields every chip of a scene shares."""
    chip = options.chip_size
    stac = scene.get("stac") or None
    doc: dict[str, Any] = {
        "scene_id": scene["id"],
        "scene_url": scene["url"],
        "scene_key": scene["key"],
        "crs": scene["crs"],
        "epsg": scene["epsg"],
        "gsd": scene["gsd"],
        "width": chip,
        "height": chip,
        "format": ENCODINGS[options.encoding],
        "dtype": scene["dtype"],
        "bands": [
            {"index": b["index"], "name": b["name"], "asset": scene["assets"][b["asset"]]["key"]}
            for b in scene["bands"]
        ],
        "scale": scene["scaling"],
        "dataset": dataset,
    }
    if stac:
        props = stac.get("properties") or {}
        doc.update({"item_id": stac.get("item"), "collection": stac.get("collection"), "properties": props})
        doc.update({k: props[k] for k in TOP_LEVEL_PROPERTIES if k in props and k != "gsd"})
    return doc
