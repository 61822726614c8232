"""Opening one scene: georeferencing, bands, nodata/alpha mask, the chip grid at the target GSD, value scaling.

`inspect_scene` reads only the header, plus (for percentile scaling) one decimated read of at most
`SURVEY_SIDE` pixels a side, which GDAL serves from the file's overviews where it has them. Its result is a
plain JSON-ready record: the plan carries it to the writers, and the manifest keeps it per scene.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import Any

import numpy as np
from fsspec.utils import get_protocol

from pipelines.tile.footprint import FootprintError, chip_footprint
from pipelines.tile.options import Scaling, TileOptions
from pipelines.tile.refs import SceneRef, probe
from pipelines.tile.rio import describe_open_error, gdal_env, is_transient_read_error, needs_s3, open_raster
from ssjdn.data.errors import DataError

SURVEY_SIDE = 1024  # pixels a side of the overview read that per-scene percentiles come from
MIN_DECIMATION = 0.5  # --gsd may ask for at most 2x upsampling: beyond that chips would be invented detail
METRES_PER_DEGREE = 2 * math.pi * 6378137.0 / 360  # WGS84 equator: GSD of geographic rasters, north-south


class SceneError(DataError):
    """This scene cannot be tiled (bad input): quarantined with the reason; the run goes on."""


class TransientSceneError(OSError):
    """Opening or reading the scene failed on the network: retried, never quarantined."""


def _raise_open_error(url: str, exc: BaseException, storage_options=None):
    if is_transient_read_error(exc):
        raise TransientSceneError(describe_open_error(url, exc)) from exc
    if get_protocol(url) != "file":  # GDAL says "does not exist" for a refused connection too: ask the server
        why = probe(url, storage_options)
        if why and why != "not found":
            raise TransientSceneError(f"{url}: unreachable ({why})") from exc
    raise SceneError(describe_open_error(url, exc)) from exc


class OpenScene:
    """The scene's datasets, open (inside `gdal_env`) for the lifetime of a `with` block."""

    def __init__(self, hrefs: list[str], storage_options: dict[str, Any] | None = None) -> None:
        self.hrefs = hrefs
        self.storage_options = storage_options
        self.datasets: list = []
        self._env = None

    def __enter__(self) -> OpenScene:
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        self._env = gdal_env(s3=needs_s3(self.hrefs), storage_options=self.storage_options)
        self._env.__enter__()
        try:
            for href in self.hrefs:
                try:
                    with (
                        warnings.catch_warnings()
                    ):  # no geotransform: the scene is refused or allowed, by name
                        warnings.simplefilter("ignore", NotGeoreferencedWarning)
                        self.datasets.append(open_raster(href, self.storage_options))
                except (RasterioError, OSError) as exc:
                    _raise_open_error(href, exc, self.storage_options)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ds in self.datasets:
            ds.close()
        self.datasets = []
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None


# ---------------------------------------------------------------------------------------------- bands


def _band_label(ds, i: int) -> str:
    desc = (ds.descriptions[i - 1] or "").strip()
    return desc or ds.colorinterp[i - 1].name


def describe_bands(ref: SceneRef, datasets) -> str:
    parts = []
    for a, ds in zip(ref.assets, datasets):
        prefix = f"{a.key}:" if len(datasets) > 1 and a.key else ""
        parts += [f"{prefix}{i} {_band_label(ds, i)}" for i in range(1, ds.count + 1)]
    return ", ".join(parts)


def _names_of(ref: SceneRef, datasets, asset: int, index: int) -> set[str]:
    ds = datasets[asset]
    names = {(ds.descriptions[index - 1] or "").strip().lower(), ds.colorinterp[index - 1].name.lower()}
    meta = ref.assets[asset].bands
    if len(meta) >= index:
        names |= {str(v).lower() for v in meta[index - 1].values() if v}
    if len(datasets) > 1 and ref.assets[asset].key and ds.count == 1:
        names.add(ref.assets[asset].key.lower())  # per-band assets: the key names the band (B04, red, ...)
    return names - {"", "undefined"}


def resolve_bands(ref: SceneRef, datasets, requested) -> list[dict[str, Any]]:
    """Output bands as `{"asset": i, "index": n, "name": ...}`; SceneError for one that does not exist."""
    flat = [(a, i) for a, ds in enumerate(datasets) for i in range(1, ds.count + 1)]
    if requested is None:
        picked = _default_bands(datasets)
    else:
        picked = []
        for b in requested:
            if isinstance(b, int):
                if not 1 <= b <= len(flat):
                    raise SceneError(
                        f"{ref.url}: band {b} does not exist (scene has {len(flat)} band(s): {describe_bands(ref, datasets)})"
                    )
                picked.append(flat[b - 1])
            else:
                hit = next((ai for ai in flat if b.lower() in _names_of(ref, datasets, *ai)), None)
                if hit is None:
                    raise SceneError(
                        f"{ref.url}: no band named {b!r} (bands: {describe_bands(ref, datasets)})"
                    )
                picked.append(hit)
    out = []
    for a, i in picked:
        meta = ref.assets[a].bands
        name = (meta[i - 1].get("name") if len(meta) >= i else None) or (
            datasets[a].descriptions[i - 1] or None
        )
        out.append({"asset": a, "index": i, "name": name or datasets[a].colorinterp[i - 1].name})
    return out


def _default_bands(datasets) -> list[tuple[int, int]]:
    """RGB by colour interpretation; else the first three non-alpha bands; else the first band. With one
    single-band file per band (STAC), band 1 of each."""
    from rasterio.enums import ColorInterp

    if len(datasets) > 1:
        if len(datasets) not in (1, 3):
            raise SceneError(
                f"{len(datasets)} assets selected: chips hold 1 or 3 bands (pick them with --bands)"
            )
        return [(a, 1) for a in range(len(datasets))]
    ds = datasets[0]
    ci = list(ds.colorinterp)
    rgb = [ci.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue) if c in ci]
    if len(rgb) == 3:
        return [(0, i) for i in rgb]
    plain = [i for i in range(1, ds.count + 1) if ci[i - 1] != ColorInterp.alpha]
    return [(0, i) for i in (plain[:3] if len(plain) >= 3 else plain[:1])]


def _mask_spec(datasets, bands: list[dict[str, Any]]) -> dict[str, Any]:
    """How invalid pixels are found: the alpha band, the bands' nodata values, the internal mask, or none."""
    from rasterio.enums import ColorInterp, MaskFlags

    first = datasets[bands[0]["asset"]]
    ci = list(first.colorinterp)
    if ColorInterp.alpha in ci:
        return {"kind": "alpha", "asset": bands[0]["asset"], "index": ci.index(ColorInterp.alpha) + 1}
    nodata = [datasets[b["asset"]].nodatavals[b["index"] - 1] for b in bands]
    if all(v is not None for v in nodata):
        return {"kind": "nodata", "nodata": [None if math.isnan(v) else float(v) for v in nodata]}
    flags = first.mask_flag_enums[bands[0]["index"] - 1]
    if MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags:
        return {"kind": "mask", "asset": bands[0]["asset"], "index": bands[0]["index"]}
    return {"kind": "none"}


# ---------------------------------------------------------------------------------------------- grid


def native_gsd(crs, transform) -> float | None:
    """Metres per pixel (the mean of both axes); degrees count 111.32 km (north-south on WGS84)."""
    if crs is None:
        return None
    xres, yres = math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)
    if crs.is_geographic:
        unit = METRES_PER_DEGREE
    else:
        try:
            unit = crs.linear_units_factor[1]
        except Exception:  # noqa: BLE001 - a CRS without linear units: take its units as metres
            unit = 1.0
    return (xres + yres) / 2 * unit


def origins(extent: int, size: int, step: int) -> list[int]:
    """Chip origins along one axis: every `step` pixels, plus one flush with the far edge so the whole extent is
    covered; a scene smaller than a chip gets one chip at 0 (padded with nodata)."""
    if extent <= size:
        return [0]
    out = list(range(0, extent - size + 1, step))
    if out[-1] + size < extent:
        out.append(extent - size)
    return out


def chip_windows(scene: dict[str, Any]) -> list[tuple[int, int]]:
    """(row_off, col_off) of every planned chip in scene pixels, row-major."""
    size, step = scene["src_size"], scene["src_step"]
    return [(r, c) for r in origins(scene["height"], size, step) for c in origins(scene["width"], size, step)]


def _is_georeferenced(ds) -> bool:
    from rasterio.transform import Affine

    return ds.crs is not None and ds.transform != Affine.identity()


def crs_fields(crs) -> dict[str, Any]:
    if crs is None:
        return {"crs": None, "epsg": None}
    epsg = crs.to_epsg()
    return {"crs": f"EPSG:{epsg}" if epsg else crs.to_wkt(), "epsg": epsg}


# ---------------------------------------------------------------------------------------------- scaling


def read_overview(scene: dict[str, Any], datasets, max_side: int, resampling: str = "nearest"):
    """The whole scene at most `max_side` pixels a side: (bands x H x W array, valid H x W bool).
    One decimated read per band group (`out_shape`): GDAL takes it from the overviews where there are some."""
    from rasterio.enums import Resampling

    w, h = scene["width"], scene["height"]
    d = max(1, math.ceil(max(w, h) / max_side))
    out_w, out_h = max(1, math.ceil(w / d)), max(1, math.ceil(h / d))
    from rasterio.windows import Window

    window = Window(0, 0, w, h)
    arrays = [
        datasets[b["asset"]].read(
            b["index"], window=window, out_shape=(out_h, out_w), resampling=Resampling[resampling]
        )
        for b in scene["bands"]
    ]
    data = np.stack(arrays)
    valid = valid_mask(scene, datasets, data, window, (out_h, out_w))
    return data, valid


def valid_mask(scene: dict[str, Any], datasets, data: np.ndarray, window, shape) -> np.ndarray:
    """True where a pixel holds data: alpha > 0, not every band at its nodata value, or the internal mask."""
    from rasterio.enums import Resampling

    mask = scene["mask"]
    kind = mask["kind"]
    if kind == "none":
        return np.ones(shape, dtype=bool)
    if kind == "nodata":
        invalid = np.ones(shape, dtype=bool)
        for band, nd in zip(data, mask["nodata"]):
            invalid &= np.isnan(band) if nd is None else (band == nd)
        return ~invalid
    ds = datasets[mask["asset"]]
    if kind == "alpha":
        alpha = ds.read(mask["index"], window=window, out_shape=shape, resampling=Resampling.nearest)
        return alpha > 0
    return ds.read_masks(mask["index"], window=window, out_shape=shape, resampling=Resampling.nearest) > 0


def _scaling(scene: dict[str, Any], datasets, scale: Scaling) -> dict[str, Any]:
    method = scale.for_dtype(scene["dtype"])
    n = len(scene["bands"])
    if method.method == "none":
        if scene["dtype"] != "uint8":
            raise SceneError(
                f"{scene['url']}: {scene['dtype']} data needs --scale (fixed:MIN,MAX or percentile:LO,HI) for 8-bit chips"
            )
        return {"method": "none"}
    if method.method == "fixed":
        return {"method": "fixed", "low": [method.low] * n, "high": [method.high] * n}
    data, valid = read_overview(scene, datasets, SURVEY_SIDE)
    low, high = [], []
    for band in data:
        values = band[valid & np.isfinite(band)] if band.dtype.kind == "f" else band[valid]
        if values.size == 0:
            low.append(None)
            high.append(None)
            continue
        lo, hi = np.percentile(values.astype(np.float64), [method.low, method.high])
        if hi <= lo:  # a constant band: mid-grey rather than black or white
            lo, hi = lo - 0.5, lo + 0.5
        low.append(float(lo))
        high.append(float(hi))
    return {
        "method": "percentile",
        "percentiles": [method.low, method.high],
        "low": low,
        "high": high,
        "survey": list(data.shape[1:]),
    }


# ---------------------------------------------------------------------------------------------- inspect


def _grid(ds) -> list:
    return [list(ds.transform)[:6], ds.width, ds.height]


def inspect_scene(ref: SceneRef, options: TileOptions, storage_options: dict[str, Any] | None = None) -> dict:
    """The scene's record (see module doc); raises SceneError (bad input) or TransientSceneError (network)."""
    from rasterio.errors import RasterioError

    if ref.problem:
        raise SceneError(ref.problem)
    if not ref.assets:
        raise SceneError(f"{ref.id}: no raster to read")
    with OpenScene([a.href for a in ref.assets], storage_options) as scene_files:
        datasets = scene_files.datasets
        try:
            return _inspect(ref, options, datasets)
        except RasterioError as exc:
            _raise_open_error(ref.url, exc, storage_options)


def _inspect(ref: SceneRef, options: TileOptions, datasets) -> dict[str, Any]:
    from rasterio.transform import Affine

    primary = datasets[0]
    georef = _is_georeferenced(primary)
    if not georef and not options.allow_ungeoreferenced:
        what = "no CRS" if primary.crs is None else "no geotransform"
        if primary.gcps[0]:
            what += " (only GCPs, which tiling does not use)"
        raise SceneError(
            f"{ref.url}: {what}; refusing to tile it (pass --allow-ungeoreferenced for pixel-only chips)"
        )
    for ds, a in zip(datasets[1:], ref.assets[1:]):
        if ds.crs != primary.crs:
            raise SceneError(f"{ref.url}: asset {a.key!r} is in {ds.crs}, the first asset in {primary.crs}")
        if ds.transform.b or ds.transform.d:
            raise SceneError(
                f"{ref.url}: asset {a.key!r} has a rotated geotransform (bands of several files must be north-up)"
            )
    bands = resolve_bands(ref, datasets, options.band_list)
    dtypes = {datasets[b["asset"]].dtypes[b["index"] - 1] for b in bands}
    if len(dtypes) > 1:
        raise SceneError(f"{ref.url}: bands of different data types {sorted(dtypes)}")
    transform = primary.transform if georef else Affine.identity()
    gsd0 = native_gsd(primary.crs, transform) if georef else None
    chip = options.chip_size
    factor = 1.0
    if options.gsd and gsd0:
        factor = options.gsd / gsd0
        if factor < MIN_DECIMATION:
            raise SceneError(
                f"{ref.url}: native GSD {gsd0:.3g} m is {1 / factor:.3g}x coarser than --gsd {options.gsd:g} m; "
                f"refusing to upsample more than {1 / MIN_DECIMATION:g}x (pick a coarser --gsd)"
            )
    src_size = max(1, round(chip * factor))  # whole source pixels per chip: integer windows, exact transforms
    src_step = max(1, round(options.step * src_size / chip))
    ovr = [
        f
        for f in (primary.overviews(bands[0]["index"]) if bands[0]["asset"] == 0 else [])
        if f <= src_size / chip + 1e-9
    ]
    scene = {
        "id": ref.id,
        "key": ref.key,
        "name": ref.name,
        "url": ref.url,
        "assets": [{"key": a.key, "href": a.href} for a in ref.assets],
        "grids": [_grid(ds) for ds in datasets],
        "stac": ref.stac,
        **crs_fields(primary.crs if georef else None),
        "georeferenced": georef,
        "transform": list(transform)[:6],
        "width": primary.width,
        "height": primary.height,
        "count": sum(ds.count for ds in datasets),
        "dtype": dtypes.pop(),
        "bands": bands,
        "native_gsd": gsd0,
        "gsd": gsd0 * src_size / chip if gsd0 else None,
        "src_size": src_size,
        "src_step": src_step,
        "overview": max(ovr) if ovr else None,
    }
    scene["mask"] = _mask_spec(datasets, bands)
    scene["scaling"] = _scaling(scene, datasets, options.scaling)
    scene["chips"] = len(chip_windows(scene))
    scene["footprint"] = None
    if georef:
        try:
            scene["footprint"] = chip_footprint(primary.crs, transform, 0, 0, primary.width, primary.height)
        except FootprintError:
            pass  # e.g. a full-disk image: its chips say which of them can be placed
    return scene


def scene_fingerprint(ref: SceneRef, options: TileOptions) -> str:
    """What decides this scene's chips, before opening it: its identity (checksum, size+mtime or ETag, STAC
    metadata) and the output options. A re-run tiles a scene again only when this changed."""
    doc = {"scene": ref.identity(), "options": options.output_options()}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()
