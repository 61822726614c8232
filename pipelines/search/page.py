"""`ssjdn query --html`: one self-contained page of result thumbnails with their captions and scores.

Images are resolved through the stored `source` URI (a tar member of a shard, or an image file URL),
shrunk to thumbnails and embedded as data URIs, so the page works offline and can be mailed around.
Each shard is streamed once however many results it holds.

Footprint maps: hits that carry a footprint (`Hit.geometry`, else their chip json's `footprint`) and come from
a tile destination (`DEST/chips/{scene_key}/shard-*.tar`) are drawn on their scene's overview, the
`DEST/_scenes/{scene_key}.png` the tile job wrote, placed by the overview's transform and CRS in
`_scenes/{scene_key}.json`: one map per scene, the PNG embedded as a data URI, one SVG outline per hit (lon/lat ->
scene CRS with pyproj -> overview pixels). No web map tiles, nothing fetched by the page. Hits without a
footprint, or whose scene has no overview, appear in the grid only, as before.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pipelines.fsio import get_fs
from pipelines.search.results import Hit
from pipelines.shard.layout import split_member_uri
from pipelines.tile.layout import CHIPS, SCENES

log = logging.getLogger(__name__)

THUMB_PX = 192


def fetch_images(
    sources: list[str], storage_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """source URI -> {"image": bytes | None, "captions": [...], "meta": the sample's json (dict) or None,
    "error": str | None}."""
    out: dict[str, dict[str, Any]] = {}
    by_shard: dict[str, dict[str, str]] = defaultdict(dict)  # shard url -> member -> source
    for src in sources:
        parts = split_member_uri(src)
        if parts is None:
            out[src] = _read_file(src, storage_options)
        else:
            by_shard[parts[0]][parts[1]] = src
    for shard, members in by_shard.items():
        out.update(_read_members(shard, members, storage_options))
    return out


def _read_file(src: str, storage_options) -> dict[str, Any]:
    try:
        fs, path = get_fs(src, storage_options)
        with fs.open(path, "rb") as f:
            return {"image": f.read(), "captions": [], "meta": None, "error": None}
    except Exception as exc:
        return {"image": None, "captions": [], "meta": None, "error": f"{type(exc).__name__}: {exc}"}


def _read_members(shard: str, members: dict[str, str], storage_options) -> dict[str, dict[str, Any]]:
    """Stream one tar and keep the wanted image members and their `json` siblings (plain bytes, no unpickling)."""
    stems = {m.split(".", 1)[0]: m for m in members}
    found: dict[str, dict[str, Any]] = {
        src: {"image": None, "captions": [], "meta": None, "error": None} for src in members.values()
    }
    try:
        fs, path = get_fs(shard, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                stem, _, ext = info.name.partition(".")
                if stem not in stems:
                    continue
                data = tar.extractfile(info).read()
                src = members[stems[stem]]
                if info.name == stems[stem]:
                    found[src]["image"] = data
                elif ext == "json":
                    try:
                        doc = json.loads(data.decode("utf-8"))
                        found[src]["captions"] = list(doc.get("captions") or [])
                        found[src]["meta"] = doc
                    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
                        pass
    except Exception as exc:
        for rec in found.values():
            rec["error"] = f"{type(exc).__name__}: {exc}"
    for rec in found.values():
        if rec["image"] is None and rec["error"] is None:
            rec["error"] = f"member not found in {shard}"
    return found


def thumbnail_uri(data: bytes, name: str, px: int = THUMB_PX) -> str:
    from ssjdn.data.images import decode_image

    img = decode_image(data, name)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


PAGE_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}.grid{display:flex;flex-wrap:wrap;gap:12px}"
    ".hit{width:210px;margin:0;border:1px solid #ccc;padding:6px}.hit img{width:192px;height:auto}"
    ".missing{width:192px;height:96px;background:#eee;font-size:small}figcaption{font-size:small}"
    "ul{padding-left:1.1em;margin:.3em 0}"
)
MAP_STYLE = (
    ".maps{display:flex;flex-wrap:wrap;gap:16px;margin-bottom:1.5em}.scene{margin:0;border:1px solid #ccc;"
    "padding:6px;max-width:100%}.overview{position:relative;display:inline-block;line-height:0;"
    "background:repeating-conic-gradient(#ddd 0 25%,#fff 0 50%) 0 0/16px 16px}"
    ".overview img{display:block;max-width:100%;height:auto}"
    ".overview svg{position:absolute;left:0;top:0;width:100%;height:100%;overflow:hidden}"
    "path.footprint{fill:rgba(255,200,0,.18);stroke:#ffc800;stroke-width:2;fill-rule:evenodd;"
    "vector-effect:non-scaling-stroke}path.footprint:hover{fill:rgba(255,200,0,.45)}"
    "text.rank{font:bold 13px sans-serif;fill:#fff;stroke:#000;stroke-width:3px;paint-order:stroke;"
    "text-anchor:middle;dominant-baseline:central;pointer-events:none}"
)


# ---------------------------------------------------------------------------------------------- footprint maps


@dataclass
class Outline:
    """One hit's footprint in its overview's pixels: an SVG path and where its rank label goes."""

    hit: Hit
    path: str
    label_xy: tuple[float, float]


@dataclass
class SceneMap:
    """A scene's overview (PNG as a data URI, its pixel size) and the outlines of the hits cut from it."""

    dest: str
    scene_key: str
    name: str
    image_uri: str | None = None
    width: int = 0
    height: int = 0
    outlines: list[Outline] = field(default_factory=list)
    error: str | None = None

    @property
    def anchor(self) -> str:
        return f"scene-{self.scene_key}"


def hit_footprint(hit: Hit, meta: dict[str, Any] | None = None):
    """The hit's footprint as a shapely geometry in lon/lat: its stored WKB, else its chip json's GeoJSON
    `footprint`; None when it has neither (or they do not parse)."""
    import shapely
    from shapely.geometry import shape

    try:
        if hit.geometry is not None:
            geom = shapely.from_wkb(hit.geometry)
        elif isinstance((meta or {}).get("footprint"), dict):
            geom = shape(meta["footprint"])
        else:
            return None
    except Exception:  # noqa: BLE001 - a broken footprint only means no outline for this hit
        return None
    return None if geom is None or geom.is_empty else geom


def scene_location(source: str, meta: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """(tile destination URL, scene_key) of a chip stored as a member of `DEST/chips/{scene_key}/shard-*.tar`
    (pipelines.tile.layout); None for any other source, or when the chip json names another scene."""
    parts = split_member_uri(source)
    if parts is None:
        return None
    folder, _, _shard = parts[0].rpartition("/")
    above, _, scene_key = folder.rpartition("/")
    dest, _, chips = above.rpartition("/")
    if chips != CHIPS or not scene_key or scene_key.startswith(".") or not dest:
        return None
    named = (meta or {}).get("scene_key")
    if named is not None and named != scene_key:
        return None
    return dest, scene_key


def fetch_scene_maps(
    hits: list[Hit], images: dict[str, dict[str, Any]], storage_options: dict[str, Any] | None = None
) -> list[SceneMap]:
    """One map per scene that holds hits with footprints (in the order of their best hit): its overview and
    record read from `DEST/_scenes/` once, each hit's footprint projected onto it. A scene whose overview
    cannot be read comes back with `error` set and no outlines."""
    groups: dict[tuple[str, str], list[tuple[Hit, Any]]] = {}
    for h in hits:
        meta = images.get(h.source, {}).get("meta")
        geom = hit_footprint(h, meta)
        where = scene_location(h.source, meta) if geom is not None else None
        if where is not None:
            groups.setdefault(where, []).append((h, geom))
    maps = []
    for (dest, scene_key), members in groups.items():
        m = SceneMap(dest=dest, scene_key=scene_key, name=scene_key)
        try:
            record, png = _read_overview(dest, scene_key, storage_options)
            m.name = str(record.get("name") or record.get("id") or scene_key)
            ov = record["overview"]
            m.width, m.height = int(ov["width"]), int(ov["height"])
            to_pixels = overview_projector(record)
            m.image_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        except Exception as exc:  # noqa: BLE001 - a missing overview costs the map, not the page
            m.error = f"{type(exc).__name__}: {exc}"
            maps.append(m)
            continue
        for h, geom in members:
            outline = footprint_outline(h, geom, to_pixels)
            if outline is not None:
                m.outlines.append(outline)
        maps.append(m)
    return maps


def _read_overview(dest: str, scene_key: str, storage_options) -> tuple[dict[str, Any], bytes]:
    fs, folder = get_fs(f"{dest}/{SCENES}", storage_options)
    with fs.open(f"{folder}/{scene_key}.json", "rb") as f:
        record = json.loads(f.read().decode("utf-8"))
    name = str(record["overview"].get("path") or f"{scene_key}.png")
    if "/" in name or name.startswith("."):  # the record names a file beside it, nothing else
        raise ValueError(f"overview path {name!r} is not a file name")
    with fs.open(f"{folder}/{name}", "rb") as f:
        return record, f.read()


def overview_projector(record: dict[str, Any]):
    """A function from an (N, 2) array of lon/lat to the overview's (col, row) pixels, from the scene record's
    CRS and the overview's affine `[a, b, c, d, e, f]` (pixel -> scene CRS). Longitudes of a geographic scene
    CRS are unwrapped around the overview's centre, so a scene across the antimeridian stays in one piece."""
    import numpy as np
    from pyproj import CRS, Transformer

    crs = CRS.from_user_input(record["crs"])
    a, b, c, d, e, f = (float(v) for v in record["overview"]["transform"])
    det = a * e - b * d
    if not det or not math.isfinite(det):
        raise ValueError(f"overview transform {record['overview']['transform']} cannot be inverted")
    w, h = float(record["overview"]["width"]), float(record["overview"]["height"])
    centre_x = c + a * w / 2 + b * h / 2
    forward = Transformer.from_crs(CRS.from_epsg(4326), crs, always_xy=True)

    def to_pixels(lonlat):
        lonlat = np.asarray(lonlat, dtype=float)
        x, y = forward.transform(lonlat[:, 0], lonlat[:, 1])
        x, y = np.asarray(x, float), np.asarray(y, float)
        if crs.is_geographic:
            x = centre_x + (x - centre_x + 180.0) % 360.0 - 180.0
        dx, dy = x - c, y - f
        return np.column_stack(((e * dx - b * dy) / det, (a * dy - d * dx) / det))

    return to_pixels


def footprint_outline(hit: Hit, geom, to_pixels) -> Outline | None:
    """The hit's footprint in overview pixels as one SVG path (every part and ring a subpath)."""
    import numpy as np
    import shapely

    try:
        pixels = shapely.transform(geom, to_pixels)
    except Exception:  # noqa: BLE001 - a footprint the CRS cannot take: no outline
        return None
    subpaths = []
    for part in shapely.get_parts(pixels):
        if not isinstance(part, shapely.Polygon):
            continue
        for ring in (part.exterior, *part.interiors):
            xy = np.asarray(ring.coords)[:, :2]
            if len(xy) < 3 or not np.isfinite(xy).all():
                continue
            points = " L".join(f"{x:.1f},{y:.1f}" for x, y in xy[:-1])
            subpaths.append(f"M{points} Z")
    if not subpaths:
        return None
    centre = pixels.centroid
    x, y = (float(centre.x), float(centre.y)) if not centre.is_empty else (math.nan, math.nan)
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    return Outline(hit=hit, path=" ".join(subpaths), label_xy=(x, y))


def render_maps(maps: list[SceneMap]) -> str:
    """The maps section: per scene its overview with an SVG overlay (viewBox = the overview's pixels) holding
    one `path.footprint` per hit and its rank (every value escaped)."""
    esc = html.escape
    figures = []
    for m in maps:
        if m.image_uri is None:
            figures.append(
                f'<figure class="scene" id="{esc(m.anchor)}"><div class="missing">overview of '
                f"{esc(m.name)} unavailable: {esc(m.error or 'not found')}</div></figure>"
            )
            continue
        shapes = []
        for o in m.outlines:
            h = o.hit
            shapes.append(
                f'<path class="footprint" data-rank="{h.rank}" data-key="{esc(h.key)}" d="{o.path}">'
                f"<title>#{h.rank} {esc(h.key)} score {h.score:.4f}</title></path>"
            )
            x, y = o.label_xy
            shapes.append(f'<text class="rank" x="{x:.1f}" y="{y:.1f}">{h.rank}</text>')
        figures.append(
            f'<figure class="scene" id="{esc(m.anchor)}"><div class="overview">'
            f'<img src="{m.image_uri}" width="{m.width}" height="{m.height}" alt="overview of {esc(m.name)}">'
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {m.width} {m.height}" '
            f'preserveAspectRatio="none">{"".join(shapes)}</svg></div>'
            f"<figcaption>{esc(m.name)} · {len(m.outlines)} "
            f"hit{'s' if len(m.outlines) != 1 else ''}</figcaption></figure>"
        )
    return f"<h2>Footprints</h2><div class='maps'>{''.join(figures)}</div>" if figures else ""


def render_hits(
    hits: list[Hit], images: dict[str, dict[str, Any]], maps: list[SceneMap] | None = None
) -> str:
    """A grid of result cards: thumbnail, rank, score, key, class, split and up to five captions (all escaped);
    with `maps`, a hit drawn on one links to it."""
    esc = html.escape
    on_map = {o.hit.key: m.anchor for m in maps or [] for o in m.outlines}
    cards = []
    for h in hits:
        rec = images.get(h.source, {})
        caps = h.extra.get("captions") or rec.get("captions") or []
        if h.extra.get("caption"):
            caps = [h.extra["caption"]]
        if rec.get("image") is not None:
            try:
                img = f'<img src="{thumbnail_uri(rec["image"], h.source)}" alt="{esc(h.key)}">'
            except Exception as exc:
                img = f'<div class="missing">image unreadable: {esc(str(exc))}</div>'
        else:
            img = f'<div class="missing">image unavailable: {esc(rec.get("error") or "not fetched")}</div>'
        cap_html = "".join(f"<li>{esc(c)}</li>" for c in caps[:5])
        link = f' <a href="#{esc(on_map[h.key])}">map</a>' if h.key in on_map else ""
        cards.append(
            f'<figure class="hit">{img}<figcaption><b>#{h.rank}</b> score {h.score:.4f}{link}<br>'
            f"<code>{esc(h.key)}</code><br>{esc(h.class_name or '')} {esc(h.split or '')}"
            f"<ul>{cap_html}</ul></figcaption></figure>"
        )
    return f"<div class='grid'>{''.join(cards)}</div>"


def render_page(
    title: str,
    hits: list[Hit],
    images: dict[str, dict[str, Any]],
    info: dict[str, Any],
    maps: list[SceneMap] | None = None,
) -> str:
    """The HTML page (every value escaped); `maps` (from `fetch_scene_maps`) above the grid."""
    esc = html.escape
    meta = " · ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in info.items())
    style = PAGE_STYLE + (MAP_STYLE if maps else "")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{style}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='meta'>{meta}</p>{render_maps(maps or [])}"
        f"{render_hits(hits, images, maps)}</body></html>"
    )
