"""Synthetic embedding-store content for store/query tests (no model needed): clustered unit vectors."""

from __future__ import annotations

import hashlib

import numpy as np

from pipelines.store.store import EmbeddingStore, VersionWriter, build_table

CLASSES = ("airport", "beach", "forest", None)


def fake_model_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def unit_vectors(n: int, dim: int, seed: int, clusters: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def image_columns(unit: int, n: int) -> dict:
    keys = [f"syn__u{unit}_{i:04d}" for i in range(n)]
    return {
        "key": keys,
        "source": [f"file:///archive/u{unit}/{k}.jpg" for k in keys],
        "split": ["test" if i % 3 == 0 else "train" for i in range(n)],
        "class": [CLASSES[i % len(CLASSES)] for i in range(n)],
        "lat": [None if i % 5 == 0 else 40.0 + i / 100 for i in range(n)],
        "lon": [None if i % 5 == 0 else -3.0 - i / 100 for i in range(n)],
    }


def write_synthetic_version(
    url: str,
    *,
    units: int = 3,
    rows: int = 50,
    dim: int = 16,
    dtype: str = "float32",
    model: str = "m1",
    max_rows_per_file: int = 1000,
    seed: int = 0,
    storage_options=None,
) -> tuple[EmbeddingStore, str, np.ndarray, dict]:
    """Commit `units` units of `rows` images each; returns (store, model_id, all vectors, all columns) sorted by key."""
    store = EmbeddingStore(url, storage_options)
    model_id = fake_model_id(model)
    writer = VersionWriter(
        store,
        model_id,
        {"dim": dim, "dtype": dtype, "config": "synthetic"},
        max_rows_per_file=max_rows_per_file,
    )
    vecs, cols = [], {}
    for u in range(units):
        v = unit_vectors(rows, dim, seed + u)
        c = image_columns(u, rows)
        table = build_table("images", c, v, dim=dim, model_id=model_id, dtype=dtype)
        writer.stage({"id": f"test/shard-{u:06d}.tar", "bad": []}, {"images": table})
        vecs.append(v)
        for k2, val in c.items():
            cols.setdefault(k2, []).extend(val)
    writer.commit()
    writer.close()
    return store, model_id, np.concatenate(vecs), cols


def is_embedding_type(t, dim: int, value_type) -> bool:
    """A portable Parquet/Arrow `fixed_size_list<value_type>[dim]` (not Ray's tensor extension type)."""
    import pyarrow as pa

    return pa.types.is_fixed_size_list(t) and t.list_size == dim and t.value_type == value_type
