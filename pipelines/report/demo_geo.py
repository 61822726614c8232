"""The demo's geo stage: which two scenes it tiles (the real `cogeo.tif` and `RGB.byte.tif` beside the checkout,
else two generated stand-ins, labelled SYNTHETIC), and its two geo queries, chosen from the tile manifest: a
bbox over the western half of the first scene and a point at the centre of the second with a radius of a few km.

The choice of scenes does not depend on the caption dataset: the real scenes are used whenever they are there,
with synthetic captions too. Tiling, embedding and searching are the regular jobs (`tile-archive`,
`reindex-archive`, `Searcher`); this module only decides what they are given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.report.demo_steps import shared_data_dirs

log = logging.getLogger(__name__)

GEO_SCENES = ("cogeo.tif", "RGB.byte.tif")
SCENES_ENV = "SSJDN_DEMO_SCENES"
SYNTHETIC_SCENES_NOTE = "SYNTHETIC SCENES (generated georeferenced rasters, not real imagery)"
# 128 px chips at each scene's own resolution: 64 chips of cogeo.tif (0.6 m) and 27 of RGB.byte.tif (300 m,
# 15 mostly-nodata ones skipped); 25 of the synthetic pair. One writer: the scenes are small. `overwrite`: the
# SOURCE is a list file in OUT, so a demo with another --out into the same store is another source.
TILE_OPTIONS: dict[str, Any] = {"chip_size": 128, "workers": 1, "overwrite": True}
NEAR_RADIUS_KM = 5.0
TEXTS = ("buildings and roads next to green trees", "a river runs through green farmland")


@dataclass(frozen=True)
class DemoScenes:
    paths: tuple[str, ...]
    synthetic: bool

    @property
    def label(self) -> str:
        if self.synthetic:
            return SYNTHETIC_SCENES_NOTE
        return "real scenes: " + ", ".join(self.paths)


def _holds_scenes(folder: Path) -> bool:
    return all((folder / name).is_file() for name in GEO_SCENES)


def scene_candidates() -> list[Path]:
    """Where the real scenes are looked for: $SSJDN_DEMO_SCENES, then `geotiff/` of the shared data folders."""
    out = [Path(os.environ[SCENES_ENV])] if os.environ.get(SCENES_ENV) else []
    return out + [d / "geotiff" for d in shared_data_dirs()]


def resolve_scenes(scenes: str | None, out_dir: str | os.PathLike) -> DemoScenes:
    """The scenes the geo stage tiles: `scenes` a folder holding cogeo.tif and RGB.byte.tif; "synthetic" forces
    the generated pair (under `out_dir`); None: the first candidate folder that holds both, else generated."""
    if scenes == "synthetic":
        return synthetic_scenes(Path(out_dir) / "synthetic-scenes")
    if scenes:
        folder = Path(scenes)
        if not _holds_scenes(folder):
            raise FileNotFoundError(f"--scenes {scenes}: expected {' and '.join(GEO_SCENES)} in that folder")
        return DemoScenes(tuple(str((folder / n).resolve()) for n in GEO_SCENES), synthetic=False)
    for folder in scene_candidates():
        if _holds_scenes(folder):
            return DemoScenes(tuple(str((folder / n).resolve()) for n in GEO_SCENES), synthetic=False)
    log.warning("no real scenes found (looked for %s)", ", ".join(map(str, scene_candidates())))
    return synthetic_scenes(Path(out_dir) / "synthetic-scenes")


def _pixels(height: int, width: int, seed: int):
    """Fields of smooth colour with a grid of lighter 'roads' and darker 'blocks': 3 x H x W uint8."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / 64.0
    base = [np.sin(x * f1 + p1) * np.cos(y * f2 + p2) for f1, f2, p1, p2 in rng.uniform(0.3, 2.0, (3, 4))]
    img = np.stack([90 + 60 * b for b in base]) + rng.normal(0, 6, (3, height, width))
    roads = (np.mgrid[0:height, 0:width] % 97 < 4).any(axis=0)
    blocks = (rng.random((height // 32 + 1, width // 32 + 1)) < 0.3).repeat(32, 0).repeat(32, 1)
    img[:, blocks[:height, :width]] *= 0.6
    img[:, roads] = 200
    return img.clip(0, 255).astype("uint8")


def synthetic_scenes(target: Path) -> DemoScenes:
    """Two small georeferenced GeoTIFFs standing in for the real pair: 512 x 512 px at 1 m in Web Mercator and
    384 x 384 px at 30 m in UTM 18N (a few dozen 128 px chips); the same bytes every time."""
    import rasterio
    from affine import Affine

    log.warning("%s: generating them under %s", SYNTHETIC_SCENES_NOTE, target)
    target.mkdir(parents=True, exist_ok=True)
    specs = [
        (GEO_SCENES[0], 512, "EPSG:3857", Affine(1.0, 0, 14_321_800.0, 0, -1.0, 4_533_000.0), 1),
        (GEO_SCENES[1], 384, "EPSG:32618", Affine(30.0, 0, 200_000.0, 0, -30.0, 2_720_000.0), 2),
    ]
    paths = []
    for name, size, crs, transform, seed in specs:
        path = target / name
        profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=crs)
        with rasterio.open(path, "w", transform=transform, **profile) as dst:
            dst.write(_pixels(size, size, seed))
        paths.append(str(path.resolve()))
    return DemoScenes(tuple(paths), synthetic=True)


def write_scene_list(scenes: DemoScenes, path: str | os.PathLike) -> str:
    """The tile job's SOURCE: a text file of the scene paths, one a line. Returns its path."""
    path = Path(path)
    path.write_text("".join(f"{p}\n" for p in scenes.paths))
    return str(path)


def _centre_lon(west: float, east: float) -> float:
    """The longitude halfway from `west` to `east` (eastwards, across the antimeridian when west > east)."""
    lon = west + ((east - west) % 360.0) / 2.0
    return lon - 360.0 if lon > 180.0 else lon


def geo_queries(scenes: list[dict[str, Any]], radius_km: float = NEAR_RADIUS_KM) -> list[dict[str, Any]]:
    """The two geo queries from tile-manifest scene entries (each with `name` and a lon/lat `bbox` [w, s, e, n]),
    in the demo's order: a bbox over the western half of the first, and `near` the centre of the second (the
    first again when there is only one) within `radius_km`. Each: {"kind", "text", "scene", filter fields}."""
    placed = [s for s in scenes if s.get("bbox")]
    if not placed:
        raise ValueError("no tiled scene has a footprint bbox: nothing to place the geo queries on")
    first, second = placed[0], placed[1 if len(placed) > 1 else 0]
    w, s, e, n = (float(v) for v in first["bbox"])
    bbox = (w, s, _centre_lon(w, e), n)
    w2, s2, e2, n2 = (float(v) for v in second["bbox"])
    near = (_centre_lon(w2, e2), (s2 + n2) / 2.0)
    return [
        {"kind": "bbox", "text": TEXTS[0], "scene": first["name"], "bbox": bbox},
        {"kind": "near", "text": TEXTS[1], "scene": second["name"], "near": near, "radius_km": radius_km},
    ]


def scenes_in_order(manifest_scenes: list[dict[str, Any]], scenes: DemoScenes) -> list[dict[str, Any]]:
    """The manifest's scene entries in the order of `scenes.paths` (the manifest sorts them by id)."""
    rank = {os.path.realpath(p): i for i, p in enumerate(scenes.paths)}
    return sorted(manifest_scenes, key=lambda s: rank.get(os.path.realpath(str(s.get("url"))), len(rank)))


def filter_label(query: dict[str, Any]) -> str:
    """How the query's geo filter reads in the report."""
    if query["kind"] == "bbox":
        box = ",".join(f"{v:.5f}" for v in query["bbox"])
        return f"--bbox {box} (western half of {query['scene']})"
    lon, lat = query["near"]
    return f"--near {lon:.5f},{lat:.5f} --radius-km {query['radius_km']:g} (centre of {query['scene']})"
