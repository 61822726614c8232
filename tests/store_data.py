"""Synthetic embedding-store content for store/query tests (no model needed): clustered unit vectors."""

from __future__ import annotations

import hashlib

import numpy as np

from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter

CLASSES = ("airport", "beach", "forest", None)


def fake_model_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def unit_tables(model_id: str, n: int, seed: int, dim: int = 16) -> dict:
    """One unit's `images` table of `n` rows (keys `syn__u{seed}_...`), for `VersionWriter.stage`."""
    return {
        "images": build_table(
            "images", image_columns(seed, n), unit_vectors(n, dim, seed), dim=dim, model_id=model_id
        )
    }


def committed_version(url: str, name: str, units: dict[str, tuple[int, int]]):
    """(store, model id) of a version holding `units` ({id: (rows, seed)}, fingerprint = id), one commit."""
    store = EmbeddingStore(url)
    mid = fake_model_id(name)
    writer = VersionWriter(store, mid, {"dim": 16, "dtype": "float32"})
    for uid, (n, seed) in units.items():
        writer.stage({"id": uid, "kind": "shard", "fingerprint": uid}, unit_tables(mid, n, seed))
    writer.commit()
    writer.close()
    return store, mid


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


def write_units_concurrently(
    url: str, prefix: str, units: int, ready_dir: str, writers: int, *, rows: int = 20, dim: int = 16
) -> list[str]:
    """One writer of a concurrency test: open the version, wait until all `writers` have opened it, then stage
    and commit `units` units named `{prefix}/shard-{i}.tar` one commit each. Returns the unit ids."""
    import os
    import time
    from pathlib import Path

    store = EmbeddingStore(url)
    model_id = fake_model_id("concurrent")
    writer = VersionWriter(store, model_id, {"dim": dim, "dtype": "float32", "config": "synthetic"})
    Path(ready_dir, f"{prefix}-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(Path(ready_dir).iterdir())) < writers:  # every writer has read the manifest by now
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other writers never started ({ready_dir})")
        time.sleep(0.01)
    ids = []
    for u in range(units):
        seed = 1000 * sum(map(ord, prefix)) + u
        cols = image_columns(u, rows)
        cols["key"] = [f"{prefix}__{k}" for k in cols["key"]]
        table = build_table("images", cols, unit_vectors(rows, dim, seed), dim=dim, model_id=model_id)
        unit_id = f"{prefix}/shard-{u:06d}.tar"
        writer.stage({"id": unit_id, "split": prefix, "bad": []}, {"images": table})
        writer.commit()
        ids.append(unit_id)
    writer.close()
    return ids


if (
    __name__ == "__main__"
):  # python -m tests.store_data URL PREFIX UNITS READY_DIR WRITERS (a test's writer process)
    import json
    import sys

    url, prefix, units, ready, writers = sys.argv[1:6]
    print(json.dumps(write_units_concurrently(url, prefix, int(units), ready, int(writers))))
