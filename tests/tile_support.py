"""Scenes and catalogs for the tiling tests (written with rasterio / pystac), the independent footprint reference,
reading chips back; the large-COG builder and the counting HTTP proxy come from benchmarks/bench_tile.py."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

from benchmarks.bench_tile import CountingProxy, mosaic_cog  # noqa: F401 - shared with the benchmark
from tests.conftest import SHARED_DATA

GEOTIFF = SHARED_DATA / "geotiff"
SHARED_SCENES = sorted(p.name for p in GEOTIFF.glob("*.tif"))


# ---------------------------------------------------------------------------------------------- scenes


def write_raster(path: Path, data: np.ndarray, *, crs=None, transform=None, nodata=None, **profile) -> Path:
    import rasterio

    data = data if data.ndim == 3 else data[None]
    kwargs = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype.name,
        nodata=nodata,
        **profile,
    )
    if crs is not None:
        kwargs["crs"] = crs
    if transform is not None:
        kwargs["transform"] = transform
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **kwargs) as dst:
        dst.write(data)
    return path


def texture(bands: int, height: int, width: int, seed: int = 0, dtype="uint8") -> np.ndarray:
    """Deterministic structured pixels (gradients + noise): compresses like imagery, differs per chip."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = np.stack(
        [(x * (b + 1) + y * (3 - b)) % 251 + rng.integers(0, 5, (height, width)) for b in range(bands)]
    )
    return out.astype(dtype)


def rotated_scene(path: Path) -> Path:
    """The Landsat scene's pixels under a geotransform rotated by 20 degrees (UTM 18N)."""
    import rasterio
    from affine import Affine

    with rasterio.open(GEOTIFF / "RGB.byte.tif") as src:
        data, t, crs = src.read(), src.transform, src.crs
    rotated = Affine.translation(t.c, t.f) @ Affine.rotation(20) @ Affine.scale(t.a, t.e)
    return write_raster(path, data, crs=crs, transform=rotated, nodata=0)


def antimeridian_scene(path: Path) -> Path:
    """512 x 512 px at 500 m in UTM zone 1N around 60 N, reaching 3.7 degrees west of the antimeridian."""
    from affine import Affine

    return write_raster(
        path,
        texture(3, 512, 512, seed=1),
        crs="EPSG:32601",
        transform=Affine(500.0, 0, 140000.0, 0, -500.0, 6_800_000.0),
    )


def polar_scene(path: Path) -> Path:
    """256 x 256 px at 2 km in NSIDC polar stereographic north (EPSG:3413) centred on the North Pole."""
    from affine import Affine

    return write_raster(
        path,
        texture(3, 256, 256, seed=2),
        crs="EPSG:3413",
        transform=Affine(2000.0, 0, -256000.0, 0, -2000.0, 256000.0),
    )


GEOS = "+proj=geos +h=35785831 +lon_0=0 +sweep=y +ellps=WGS84 +units=m +no_defs"


def geostationary_scene(path: Path) -> Path:
    """A full-disk geostationary image (1024 x 1024 px at 11 km): its corner chips lie off the globe."""
    from affine import Affine

    half = 5_632_000.0
    return write_raster(
        path, texture(1, 1024, 1024, seed=3), crs=GEOS, transform=Affine(11000.0, 0, -half, 0, -11000.0, half)
    )


def ungeoreferenced_scene(path: Path) -> Path:
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():  # on purpose: a scan without CRS or geotransform
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return write_raster(path, texture(3, 300, 300, seed=4))


def uint16_scene(path: Path, *, nodata=0) -> Path:
    """16-bit reflectance-like values 0..10000 in UTM 32N, with a nodata stripe on the left."""
    from affine import Affine

    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:300, 0:400]
    data = np.stack([(x * 20 + y * 5 + rng.integers(0, 300, x.shape)) % 10001 for _ in range(4)]).astype(
        "uint16"
    )
    data[:, :, :40] = nodata
    return write_raster(
        path, data, crs="EPSG:32632", transform=Affine(10, 0, 500000, 0, -10, 5_000_000), nodata=nodata
    )


def float_scene(path: Path) -> Path:
    """float32 with NaN nodata in a corner (EPSG:3035)."""
    from affine import Affine

    data = texture(1, 300, 300, seed=6).astype("float32") / 250.0
    data[:, :100, :100] = np.nan
    return write_raster(
        path,
        data,
        crs="EPSG:3035",
        transform=Affine(20, 0, 4_000_000, 0, -20, 3_000_000),
        nodata=float("nan"),
    )


def copy_shared(names, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(GEOTIFF / n, folder / n)
    return folder


# ---------------------------------------------------------------------------------------------- STAC


def stac_item(
    item_id: str,
    href: str,
    *,
    props=None,
    bands=None,
    stac11: bool = False,
    key="visual",
    media_type="image/tiff; application=geotiff; profile=cloud-optimized",
    extra_assets=None,
):
    """A pystac Item with one raster asset (band names in `eo:bands`, or STAC 1.1 `bands`)."""
    import datetime as dt

    import pystac

    item = pystac.Item(
        id=item_id,
        geometry={"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]},
        bbox=[0, 0, 1, 1],
        datetime=dt.datetime(2021, 6, 1, 10, 30, tzinfo=dt.timezone.utc),
        properties={
            "platform": "landsat-7",
            "eo:cloud_cover": 12.5,
            "instruments": ["etm+"],
            **(props or {}),
        },
    )
    extra = {}
    if bands:
        entries = [{"name": n, "common_name": c} for n, c in bands]
        extra = (
            {"bands": [{"name": n, "eo:common_name": c} for n, c in bands]}
            if stac11
            else {"eo:bands": entries}
        )
    item.add_asset(key, pystac.Asset(href=href, media_type=media_type, roles=["data"], extra_fields=extra))
    for k, asset in (extra_assets or {}).items():
        item.add_asset(k, asset)
    return item


def save_catalog(root: Path, items, *, kind: str = "catalog") -> Path:
    """Write a self-contained catalog (or collection) of `items` under `root`; returns its JSON path."""
    import datetime as dt

    import pystac

    if kind == "collection":
        extent = pystac.Extent(
            pystac.SpatialExtent([[-180, -90, 180, 90]]),
            pystac.TemporalExtent([[dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), None]]),
        )
        cat = pystac.Collection(id="scenes", description="test scenes", extent=extent)
    else:
        cat = pystac.Catalog(id="scenes", description="test scenes")
    for it in items:
        cat.add_item(it)
    cat.normalize_hrefs(str(root))
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / ("collection.json" if kind == "collection" else "catalog.json")


# ---------------------------------------------------------------------------------------------- reading back


def chips_of(dest) -> dict[str, dict]:
    """key -> {"json": doc, "image": bytes, "ext": ...} of every committed chip (via the manifest)."""
    dest = Path(dest)
    m = json.loads((dest / "_manifest.json").read_text())
    out: dict[str, dict] = {}
    for e in m["shards"]:
        with tarfile.open(dest / e["path"]) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                entry = out.setdefault(key, {})
                data = tf.extractfile(member).read()
                if ext == "json":
                    entry["json"] = json.loads(data)
                else:
                    entry["image"], entry["ext"] = data, ext
    return out


def decode(image: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image)))


def reference_footprint(crs, transform, window: dict, n: int = 21):
    """The test's own densified window outline -> `rasterio.warp.transform_geom` (written independently of
    pipelines.tile.footprint: points by pixel-space interpolation along each edge, corners shared)."""
    from rasterio.warp import transform_geom

    c0, r0 = window["col_off"], window["row_off"]
    c1, r1 = c0 + window["width"], r0 + window["height"]
    corners = [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]
    ring = []
    for (ca, ra), (cb, rb) in zip(corners, corners[1:] + corners[:1]):
        for k in range(n - 1):
            f = k / (n - 1)
            ring.append(transform @ (ca + (cb - ca) * f, ra + (rb - ra) * f))
    ring.append(ring[0])
    return transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})


def flat_coords(geom) -> np.ndarray:
    polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    return np.array([p for poly in polys for ring in poly for p in ring], dtype=float)
