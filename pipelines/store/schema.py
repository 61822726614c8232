"""The embedding store's layout and schema: every name a store file, folder or column has, defined here only.

    STORE/{model_id}/_manifest.json              commit point: committed files (rows, sha256, bytes) and units
    STORE/{model_id}/_commit.lock                serialises commits of concurrent writers (pipelines.store.manifest)
    STORE/{model_id}/images/part-*.parquet       one row per image
    STORE/{model_id}/captions/part-*.parquet     one row per caption (optional)
    STORE/{model_id}/_staging/{run_id}/...       files of a run that are not committed yet (never read)
    STORE/{model_id}/_staging/{run_id}.lease.json  that run's liveness record (host, pid, expiry)
    STORE/{model_id}/_flat/{table}/g{generation}/  exact-search matrix cache (pipelines.search.matrix_cache)
    STORE/{model_id}/_ann/{table}/g{generation}/   ANN index (pipelines.search.ann)

`model_id` is the sha256 of the checkpoint file. `_flat/` and `_ann/` hold derived data, rebuilt from a
snapshot whenever missing or stale.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.errors import PipelineError
from pipelines.geo.geoparquet import BBOX, GEOMETRY, footprint_columns, geo_fields

FORMAT = "ssjdn-embedding-store/1"
MANIFEST = "_manifest.json"
COMMIT_LOCK = "_commit.lock"
STAGING = "_staging"
LEASE_SUFFIX = ".lease.json"
MATRIX_CACHE_DIR = "_flat"
ANN_DIR = "_ann"
TABLES = ("images", "captions")
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
DEFAULT_MAX_ROWS_PER_FILE = 50_000
ROW_GROUP_ROWS = 8192
MODEL_ID_RE = re.compile(r"^[0-9a-f]{64}$")

# Column names. Both tables share META_COLUMNS (in schema order; `class` is the scene class name, null when
# unlabelled); `captions` adds CAPTION_COLUMNS after `key`.
KEY = "key"
EMBEDDING = "embedding"
META_COLUMNS = (KEY, "source", "split", "class", "lat", "lon")
CAPTION_COLUMNS = ("image_key", "caption_index", "caption")
# Schema 2 (geo): the footprint (GeoParquet `geometry` WKB + `bbox` covering) and the chip's scalar STAC
# properties. GEO_META_COLUMNS are what a hit carries (the footprint is read only when asked for).
GEO_META_COLUMNS = ("datetime", "scene_id", "cloud_cover", "platform")
GEO_COLUMNS = (GEOMETRY, BBOX, *GEO_META_COLUMNS)
SCHEMA_KEY = "schema"  # in the manifest's `model`
SCHEMA_PLAIN, SCHEMA_GEO = 1, 2
CURRENT_SCHEMA = SCHEMA_GEO


class StoreError(PipelineError):
    """The store cannot answer: empty, unknown version, corrupt manifest or file, incompatible write."""


def check_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not MODEL_ID_RE.match(model_id):
        raise StoreError(f"{model_id!r} is not a model_id (the sha256 hex digest of a checkpoint)")
    return model_id


def check_table(table: str) -> str:
    if table not in TABLES:
        raise StoreError(f"unknown table {table!r}; expected one of {', '.join(TABLES)}")
    return table


def schema_version(model: dict[str, Any]) -> int:
    """The schema a version's files have, from its manifest's `model` (absent: written before geo columns)."""
    return int(model.get(SCHEMA_KEY, SCHEMA_PLAIN))


def has_geo(model: dict[str, Any]) -> bool:
    return schema_version(model) >= SCHEMA_GEO


def meta_columns(table: str, geo: bool = True) -> tuple[str, ...]:
    """The metadata columns of `table` (everything a hit carries): META_COLUMNS, the geo scalars of a geo
    version, plus CAPTION_COLUMNS for captions."""
    cols = META_COLUMNS + (GEO_META_COLUMNS if geo else ())
    return cols + (CAPTION_COLUMNS if check_table(table) == "captions" else ())


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype {dtype!r} is not one of {sorted(DTYPES)}")
    # Non-null items: Parquet then stores no definition level per float, which reads ~2x faster.
    return pa.list_(pa.field("item", DTYPES[dtype], nullable=False), dim)


def table_schema(table: str, dim: int, dtype: str = "float32", geo: bool = True) -> pa.Schema:
    """The Parquet schema of `table` ("images" or "captions"); documented in docs/store.md. `geo=False`: the
    schema of versions written before the geo columns."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    fields = [pa.field(KEY, pa.string(), nullable=False)]
    if table == "captions":
        fields += [
            pa.field("image_key", pa.string(), nullable=False),
            pa.field("caption_index", pa.int32(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
        ]
    fields += [
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("class", pa.string()),
        pa.field("lat", pa.float64()),
        pa.field("lon", pa.float64()),
    ]
    if geo:
        fields += [
            *geo_fields(),
            pa.field("datetime", pa.timestamp("us", tz="UTC")),
            pa.field("scene_id", pa.string()),
            pa.field("cloud_cover", pa.float64()),
            pa.field("platform", pa.string()),
        ]
    fields += [
        pa.field("model_id", pa.string(), nullable=False),
        pa.field(EMBEDDING, embedding_type(dim, dtype), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    return pa.schema(fields)


def embedding_array(matrix: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """A portable `fixed_size_list<float>[D]` column from an [N, D] matrix (not Ray's tensor extension type)."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [N, D] array, got shape {matrix.shape}")
    flat = np.ascontiguousarray(matrix, dtype=np.dtype(dtype)).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError("embeddings contain NaN or infinite values")
    values = pa.array(flat, type=DTYPES[dtype])
    return pa.FixedSizeListArray.from_arrays(values, type=embedding_type(matrix.shape[1], dtype))


def embeddings_to_numpy(column: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """[N, D] numpy matrix from a fixed-size-list column (zero-copy where the layout allows)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(dtype, copy=False)


def build_table(
    table: str,
    columns: dict[str, Iterable[Any]],
    embeddings: np.ndarray,
    *,
    dim: int,
    model_id: str,
    dtype: str = "float32",
    created_at: datetime | None = None,
    geo: bool = True,
) -> pa.Table:
    """Assemble one table's rows, sorted by key so identical input gives identical files.

    `columns["geometry"]` may hold footprints (WKB, shapely, GeoJSON dicts or None, lon/lat): they become the
    `geometry` and `bbox` columns, and `lat`/`lon` of a row with a footprint are its centroid."""
    n = len(embeddings)
    schema = table_schema(table, dim, dtype, geo=geo)
    created_at = created_at or datetime.now(timezone.utc)
    data: dict[str, Any] = {}
    if geo and columns.get(GEOMETRY) is not None:
        fp = footprint_columns(columns[GEOMETRY])
        if len(fp.geometry) != n:
            raise ValueError(f"column {GEOMETRY!r} has {len(fp.geometry)} values for {n} embeddings")
        has = np.asarray(fp.geometry.is_valid().to_numpy(zero_copy_only=False), bool)
        data[GEOMETRY], data[BBOX] = fp.geometry, fp.bbox
        for name, centre in (("lat", fp.lat), ("lon", fp.lon)):
            given = list(columns.get(name, [None] * n))
            data[name] = pa.array(
                [c if h else g for c, g, h in zip(centre.to_pylist(), given, has)], pa.float64()
            )
    for f in schema:
        if f.name in data:
            continue
        if f.name == EMBEDDING:
            data[f.name] = embedding_array(np.asarray(embeddings).reshape(n, dim), dtype)
        elif f.name == "model_id":
            data[f.name] = pa.array([model_id] * n, pa.string())
        elif f.name == "created_at":
            data[f.name] = pa.array([created_at] * n, f.type)
        else:
            values = list(columns.get(f.name, [None] * n))
            if len(values) != n:
                raise ValueError(f"column {f.name!r} has {len(values)} values for {n} embeddings")
            data[f.name] = pa.array(values, f.type)
    out = pa.table(data, schema=schema)
    return out.sort_by(KEY) if n else out
