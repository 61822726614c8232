"""`ssjdn query --html`: one self-contained page of result thumbnails with their captions and scores.

Images are resolved through the stored `source` URI (a tar member of a shard, or an image file URL),
shrunk to thumbnails and embedded as data URIs, so the page works offline and can be mailed around.
Each shard is streamed once however many results it holds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import tarfile
from collections import defaultdict
from typing import Any

from pipelines.fsio import get_fs
from pipelines.search.results import Hit
from pipelines.shard.layout import split_member_uri

log = logging.getLogger(__name__)

THUMB_PX = 192


def fetch_images(
    sources: list[str], storage_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """source URI -> {"image": bytes | None, "captions": [...], "error": str | None}."""
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
            return {"image": f.read(), "captions": [], "error": None}
    except Exception as exc:
        return {"image": None, "captions": [], "error": f"{type(exc).__name__}: {exc}"}


def _read_members(shard: str, members: dict[str, str], storage_options) -> dict[str, dict[str, Any]]:
    """Stream one tar and keep the wanted image members and their `json` siblings (plain bytes, no unpickling)."""
    stems = {m.split(".", 1)[0]: m for m in members}
    found: dict[str, dict[str, Any]] = {
        src: {"image": None, "captions": [], "error": None} for src in members.values()
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
                        found[src]["captions"] = list(json.loads(data.decode("utf-8")).get("captions") or [])
                    except (ValueError, UnicodeDecodeError, AttributeError):
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


def render_hits(hits: list[Hit], images: dict[str, dict[str, Any]]) -> str:
    """A grid of result cards: thumbnail, rank, score, key, class, split and up to five captions (all escaped)."""
    esc = html.escape
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
        cards.append(
            f'<figure class="hit">{img}<figcaption><b>#{h.rank}</b> score {h.score:.4f}<br>'
            f"<code>{esc(h.key)}</code><br>{esc(h.class_name or '')} {esc(h.split or '')}"
            f"<ul>{cap_html}</ul></figcaption></figure>"
        )
    return f"<div class='grid'>{''.join(cards)}</div>"


def render_page(title: str, hits: list[Hit], images: dict[str, dict[str, Any]], info: dict[str, Any]) -> str:
    """The HTML page (every value escaped)."""
    esc = html.escape
    meta = " · ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in info.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{PAGE_STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='meta'>{meta}</p>{render_hits(hits, images)}</body></html>"
    )
