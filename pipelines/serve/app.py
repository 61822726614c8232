"""The HTTP search service (FastAPI): JSON API, the search page, thumbnails; see docs/serve.md.

    GET  /search?text=...&k=10&where=...&mode=exact|ann&bbox=W,S,E,N&near=LON,LAT&radius_km=R&after=&before=
    POST /search   {"text": ..., "k": ..., "where": ..., "bbox": [w, s, e, n], "near": [lon, lat], "radius_km": r,
                    "after": "2024-05-01", "before": ...}
    POST /search/image   (multipart: file, k, where, mode)   GET /items/{key}    GET /thumbnails/{key}
    GET  /health         GET /openapi.json                     GET /  (the page; its assets under /static/)

Every error is JSON `{"error": "<one line>", "status": <code>}`. With a token configured, every API route
(not /health, not the page's static assets) needs `Authorization: Bearer <token>`. Request bodies, text
length, k, upload size and image pixels are bounded (ServeOptions). Keys are looked up in the store; nothing
from a request becomes a path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from pipelines.errors import PipelineError
from pipelines.geo.errors import GeoFilterError
from pipelines.search.searcher import ImageTooLargeError, Searcher
from pipelines.search.searcher import Query as SearchQuery
from pipelines.search.where import FilterError
from pipelines.serve.batcher import Batcher
from pipelines.serve.media import MediaError, MediaReader, public_url, thumbnail
from pipelines.serve.options import ServeOptions
from pipelines.store.schema import StoreError

log = logging.getLogger("ssjdn.serve")
access_log = logging.getLogger("ssjdn.serve.access")

STATIC = Path(__file__).parent / "static"
# The page's assets: a fixed table (a request names one of these, never a file).
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
MAX_KEY_CHARS = 512


class ApiError(HTTPException):
    """An HTTP error with a one-line reason (rendered as {"error", "status"})."""


class TimeWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: str | None = None
    before: str | None = None


class SearchRequest(BaseModel):
    """POST /search. Exactly one of `text` or `vector`; the geo filters (ANDed with `where`): `bbox`, `near`
    with `radius_km`, `after` / `before` (or `time: {"after", "before"}`)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="the query caption")
    vector: list[float] | None = Field(None, max_length=8192, description="a ready query embedding")
    k: int = Field(10, description="number of results")
    where: str | None = Field(None, description="filter, e.g. class = 'airport' AND split = 'test'")
    table: Literal["images", "captions"] = "images"
    mode: Literal["exact", "ann"] | None = Field(
        None, description="default: exact, or ann when served with --ann"
    )
    bbox: list[float] | str | None = Field(
        None, description="[minlon, minlat, maxlon, maxlat] (minlon > maxlon: across the antimeridian)"
    )
    near: list[float] | str | None = Field(None, description="[lon, lat]: with radius_km")
    radius_km: float | None = Field(None, description="geodesic distance from `near` to a footprint, km")
    after: str | None = Field(None, description="ISO date or datetime, inclusive")
    before: str | None = Field(None, description="ISO date or datetime, inclusive (a date: its end)")
    time: TimeWindow | None = Field(None, description="the same as after / before")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:500] or "error"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": _one_line(message), "status": status}, status_code=status, headers=headers)


def _status_of(exc: PipelineError) -> int:
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, StoreError):
        return 503
    if isinstance(exc, MediaError):
        return 502
    return 422


class _Limits:
    """Pure ASGI middleware: request-body limits (413 before the body is read when Content-Length says so,
    and while it is read otherwise) and one structured JSON access-log line per request."""

    def __init__(self, app, options: ServeOptions) -> None:
        self.app = app
        self.options = options

    def limit(self, path: str) -> int:
        if path == "/search/image":
            return self.options.max_upload_bytes + (64 << 10)  # the file plus the form fields
        return self.options.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        limit = self.limit(scope["path"])
        status = {"code": 500, "bytes": 0}
        request_id = uuid.uuid4().hex[:12]

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                status["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                await _error(413, f"request body over the limit of {limit} bytes")(
                    scope, receive, send_logged
                )
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise ApiError(413, f"request body over the limit of {limit} bytes")
                return message

            await self.app(scope, limited_receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "id": request_id,
                        "client": client[0],
                        "method": scope.get("method"),
                        "path": scope["path"],  # never the query string: it holds what analysts search for
                        "status": status["code"],
                        "bytes": status["bytes"],
                        "ms": round((time.perf_counter() - t0) * 1000, 2),
                    }
                )
            )


def create_app(
    searcher: Searcher, options: ServeOptions | None = None, *, token: str | None = None
) -> FastAPI:
    """The service around an open `Searcher` (which it does not close; the caller owns it)."""
    options = options or ServeOptions()
    media = MediaReader(options.storage_options)
    started = time.time()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batcher"] = Batcher(searcher, options.max_batch)
        try:
            yield
        finally:  # graceful shutdown: uvicorn has stopped taking requests and drained the open ones
            await asyncio.to_thread(state["batcher"].close)
            log.info("search service stopped")

    app = FastAPI(
        title="ssjdn search",
        version="1",
        description="Text and image search over an SSJDN embedding store.",
        docs_url=None,  # Swagger UI would load from a CDN: /openapi.json is the (offline) description
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(_Limits, options=options)

    # ------------------------------------------------------------------------------------------ errors

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return _error(
            422, f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid")
        )

    @app.exception_handler(PipelineError)
    async def pipeline_error(request: Request, exc: PipelineError):
        message = str(exc)
        if isinstance(exc, (FilterError, GeoFilterError)):  # messages name the CLI flag; here a parameter
            message = message.removeprefix("--")
        return _error(_status_of(exc), message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
        return _error(500, "internal error (the server log has the details)")

    # ------------------------------------------------------------------------------------------ auth

    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    api = [Depends(authorize)]

    # ------------------------------------------------------------------------------------------ search

    def make_query(text, vector, image, k, where, table, mode, geo=None) -> SearchQuery:
        if text is not None and len(text) > options.max_text_chars:
            raise ApiError(422, f"text is {len(text)} characters; the limit is {options.max_text_chars}")
        if text is not None and not text.strip():
            raise ApiError(422, "text is empty")
        if not 1 <= k <= options.max_k:
            raise ApiError(422, f"k must be between 1 and {options.max_k} (got {k})")
        if where is not None and not where.strip():
            where = None
        ann = mode == "ann"  # exact unless asked: ANN trades recall for speed
        query = SearchQuery(
            text=text, vector=vector, image=image, k=k, where=where, table=table, ann=ann, **(geo or {})
        )
        searcher.check(query)  # a bad filter answers now, not from inside a batch
        return query

    async def answer(query: SearchQuery) -> dict[str, Any]:
        result = await asyncio.wrap_future(state["batcher"].submit(query))
        out = {
            "query": result.query,
            "model_id": result.model_id,
            "generation": result.generation,
            "table": result.table,
            "mode": result.mode,
            "k": query.k,
            "note": result.note,
            "timings": result.timings,
            "ann": _ann_summary(result.ann),
            "hits": [],
        }
        for h in result.hits:
            hit = {
                "rank": h.rank,
                "score": h.score,
                "key": h.key,
                "split": h.split,
                "class": h.class_name,
                "lat": h.lat,
                "lon": h.lon,
            }
            hit.update(h.extra)
            if result.table == "images":
                hit["thumbnail"] = f"/thumbnails/{quote(h.key, safe='')}"
                hit["item"] = f"/items/{quote(h.key, safe='')}"
            out["hits"].append(hit)
        return out

    @app.get("/search", dependencies=api, summary="search by text")
    async def search_get(
        text: str = Query(..., description="the query caption"),
        k: int = Query(10, description="number of results"),
        where: str | None = Query(None, description="filter"),
        table: Literal["images", "captions"] = "images",
        mode: Literal["exact", "ann"] | None = None,
        bbox: str | None = Query(None, description="MINLON,MINLAT,MAXLON,MAXLAT"),
        near: str | None = Query(None, description="LON,LAT (with radius_km)"),
        radius_km: str | None = Query(None, description="km from near"),
        after: str | None = Query(None, description="ISO date or datetime"),
        before: str | None = Query(None, description="ISO date or datetime"),
    ):
        geo = dict(bbox=bbox, near=near, radius_km=radius_km, after=after, before=before)
        return await answer(make_query(text, None, None, k, where, table, mode, geo))

    @app.post("/search", dependencies=api, summary="search by text or vector (JSON body)")
    async def search_post(body: SearchRequest):
        if (body.text is None) == (body.vector is None):
            raise ApiError(422, "give exactly one of text or vector")
        after, before = body.after, body.before
        if body.time is not None:
            if after is not None or before is not None:
                raise ApiError(422, "give after / before either at the top level or in time, not both")
            after, before = body.time.after, body.time.before
        geo = dict(bbox=body.bbox, near=body.near, radius_km=body.radius_km, after=after, before=before)
        return await answer(
            make_query(body.text, body.vector, None, body.k, body.where, body.table, body.mode, geo)
        )

    @app.post("/search/image", dependencies=api, summary="search by an uploaded image")
    async def search_image(
        file: UploadFile = File(..., description="the query image (JPEG, PNG, TIFF)"),
        k: int = Form(10),
        where: str | None = Form(None),
        table: Literal["images", "captions"] = Form("images"),
        mode: Literal["exact", "ann"] | None = Form(None),
    ):
        data = await file.read(options.max_upload_bytes + 1)
        if len(data) > options.max_upload_bytes:
            raise ApiError(413, f"the upload is over the limit of {options.max_upload_bytes} bytes")
        # The limits and the filter first (a stand-in image), then the decoding.
        query = make_query(None, None, b"upload", k, where, table, mode)
        pixels = await asyncio.to_thread(searcher.image_pixels, data)  # off the event loop
        query = dataclasses.replace(query, image=pixels)
        out = await answer(query)
        out["query"] = f"image {file.filename or 'upload'}"[:200]
        return out

    # ------------------------------------------------------------------------------------------ items

    def lookup(key: str) -> dict[str, Any]:
        if len(key) > MAX_KEY_CHARS:
            raise ApiError(404, "no such key")
        row = searcher.item(key)
        if row is None:
            raise ApiError(404, f"no image with key {key[:80]!r} in this store")
        return row

    @app.get("/items/{key}", dependencies=api, summary="an image's metadata")
    def item(key: str):
        row = lookup(key)
        meta = media.sample_meta(row["source"])
        return {
            "key": row["key"],
            "source": public_url(row["source"]),
            "split": row["split"],
            "class": row["class"],
            "lat": row["lat"],
            "lon": row["lon"],
            **meta,
            "thumbnail": f"/thumbnails/{quote(row['key'], safe='')}",
            "generation": searcher.generation,
        }

    @app.get("/thumbnails/{key}", dependencies=api, summary="an image's bytes (read from its shard)")
    def thumb(key: str):
        row = lookup(key)
        data, name = media.image(row["source"], max_bytes=options.max_stored_image_bytes)
        body, kind = thumbnail(
            data, name, passthrough_bytes=options.passthrough_bytes, max_pixels=options.max_image_pixels
        )
        return Response(
            body,
            media_type=kind,
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    # ------------------------------------------------------------------------------------------ operations

    @app.get("/health", summary="liveness / readiness (no token needed; no data)")
    def health():
        status = searcher.status()
        batcher = state.get("batcher")
        return {
            "status": "ok",
            "model_id": status["model_id"],
            "generation": status["generation"],
            "dim": status["dim"],
            "tables": status["tables"],
            "auth_required": token is not None,
            "limits": {
                "max_k": options.max_k,
                "max_text_chars": options.max_text_chars,
                "max_upload_bytes": options.max_upload_bytes,
                "max_image_pixels": options.max_image_pixels,
            },
            "batching": {"batches": batcher.batches, "queries": batcher.queries} if batcher else None,
            "uptime_s": round(time.time() - started, 1),
        }

    # ------------------------------------------------------------------------------------------ the page

    page_headers = {
        "Content-Security-Policy": PAGE_CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    @app.get("/", include_in_schema=False)
    def page():
        return Response(
            (STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=page_headers
        )

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str):
        kind = ASSETS.get(name)
        if kind is None:
            raise ApiError(404, "no such asset")
        return Response((STATIC / name).read_bytes(), media_type=kind, headers=page_headers)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    return app


def _ann_summary(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    if not meta:
        return None
    k = meta.get("recall_k", 10)
    return {f"recall@{k}": meta.get(f"recall@{k}"), "recall_query_kind": meta.get("recall_query_kind")}
