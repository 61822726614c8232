"""Embedding store: schema, bounded files, commit protocol (staged files invisible), versions, bad manifests."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.store.store import (
    EmbeddingStore,
    StoreError,
    VersionWriter,
    build_table,
    embeddings_to_numpy,
    table_schema,
)
from tests.store_data import (
    fake_model_id,
    image_columns,
    is_embedding_type,
    unit_vectors,
    write_synthetic_version,
)


def test_roundtrip_schema_and_bounded_files(tmp_path):
    store, mid, vecs, cols = write_synthetic_version(
        str(tmp_path / "store"), units=3, rows=50, max_rows_per_file=20
    )
    manifest = store.manifest()
    assert manifest.model_id == mid and manifest.rows("images") == 150
    assert [u["id"] for u in manifest.units] == [f"test/shard-{u:06d}.tar" for u in range(3)]
    assert all(u["images"] == 50 for u in manifest.units)
    files = store.committed_files(manifest, "images")
    assert len(files) == 9  # 50 rows per unit in files of at most 20: 20 + 20 + 10
    for path in files:
        meta = pq.read_metadata(path)
        assert meta.num_rows <= 20
        assert is_embedding_type(pq.read_schema(path).field("embedding").type, 16, pa.float32())
    table = store.read_table(manifest)
    assert table.schema.equals(table_schema("images", 16))
    got = dict(zip(table.column("key").to_pylist(), embeddings_to_numpy(table.column("embedding"))))
    for key, v in zip(cols["key"], vecs):
        np.testing.assert_array_equal(got[key], v)
    norms = np.linalg.norm(embeddings_to_numpy(table.column("embedding")), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    # nullable geo columns stay null, not NaN
    assert table.column("lat").null_count == 30 and table.column("class").null_count > 0
    assert set(table.column("model_id").to_pylist()) == {mid}


def test_float16_store(tmp_path):
    store, _, vecs, cols = write_synthetic_version(str(tmp_path / "s"), units=1, rows=10, dtype="float16")
    table = store.read_table(store.manifest())
    assert is_embedding_type(table.schema.field("embedding").type, 16, pa.float16())
    got = embeddings_to_numpy(table.column("embedding"))
    order = np.argsort(cols["key"])
    np.testing.assert_allclose(got, vecs[order], atol=2e-3)


def test_staged_units_are_invisible_until_commit(tmp_path):
    url = str(tmp_path / "store")
    store, mid, _, _ = write_synthetic_version(url, units=1, rows=5)
    writer = VersionWriter(store, mid, {"dim": 16, "dtype": "float32"})
    t = build_table("images", image_columns(7, 5), unit_vectors(5, 16, 7), dim=16, model_id=mid)
    writer.stage({"id": "test/shard-000007.tar"}, {"images": t})
    # staged but not committed: a reader still sees exactly the first unit
    assert store.read_table(store.manifest()).num_rows == 5
    staged = list((tmp_path / "store" / mid / "_staging").rglob("*.parquet"))
    assert len(staged) == 1
    # a later writer (the re-run after a kill) clears leftovers of dead runs
    writer2 = VersionWriter(store, mid, {"dim": 16, "dtype": "float32"})
    writer2.remove_stale_staging()
    assert not (tmp_path / "store" / mid / "_staging").exists()
    writer2.stage({"id": "test/shard-000007.tar"}, {"images": t})
    assert writer2.commit() == 1
    assert store.read_table(store.manifest()).num_rows == 10
    assert store.manifest().generation == 2


def test_unlisted_files_are_not_read(tmp_path):
    """A file at a final name that the manifest does not list (killed between move and manifest) is ignored."""
    store, mid, _, _ = write_synthetic_version(str(tmp_path / "store"), units=1, rows=5)
    stray = tmp_path / "store" / mid / "images" / "part-stray-0000.parquet"
    t = build_table("images", image_columns(9, 3), unit_vectors(3, 16, 9), dim=16, model_id=mid)
    pq.write_table(t, stray)
    assert store.read_table(store.manifest()).num_rows == 5


def test_reopen_with_other_dtype_or_dim_is_refused(tmp_path):
    store, mid, _, _ = write_synthetic_version(str(tmp_path / "store"), units=1, rows=3)
    with pytest.raises(StoreError, match="dtype='float32'.*dtype='float16'"):
        VersionWriter(store, mid, {"dim": 16, "dtype": "float16"})
    with pytest.raises(StoreError, match="dim=16"):
        VersionWriter(store, mid, {"dim": 32, "dtype": "float32"})


def test_committed_unit_cannot_be_rewritten(tmp_path):
    store, mid, _, _ = write_synthetic_version(str(tmp_path / "store"), units=1, rows=3)
    writer = VersionWriter(store, mid, {"dim": 16, "dtype": "float32"})
    t = build_table("images", image_columns(0, 3), unit_vectors(3, 16, 0), dim=16, model_id=mid)
    with pytest.raises(StoreError, match="append-only"):
        writer.stage({"id": "test/shard-000000.tar"}, {"images": t})


def test_versions_empty_store_and_unknown_model(tmp_path):
    url = str(tmp_path / "store")
    with pytest.raises(StoreError, match="is empty"):
        EmbeddingStore(url).resolve_model_id()
    _, m1, _, _ = write_synthetic_version(url, model="one", units=1, rows=2)
    store, m2, _, _ = write_synthetic_version(url, model="two", units=1, rows=2)
    assert set(store.model_ids()) == {m1, m2}
    assert store.resolve_model_id(m1[:10]) == m1
    with pytest.raises(StoreError, match="is not in store"):
        store.resolve_model_id("0" * 64 if not m1.startswith("0") else "f" * 64)
    with pytest.raises(StoreError, match="not a model_id"):
        store.version_path("../etc")


def test_manifest_with_escaping_path_is_refused(tmp_path):
    store, mid, _, _ = write_synthetic_version(str(tmp_path / "store"), units=1, rows=2)
    path = tmp_path / "store" / mid / "_manifest.json"
    doc = json.loads(path.read_text())
    doc["files"][0]["path"] = "../../outside.parquet"
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="unsafe path"):
        store.read_table(store.manifest())


@pytest.mark.integration
def test_store_on_s3(s3_bucket):
    url = f"s3://{s3_bucket}/emb"
    store, mid, vecs, cols = write_synthetic_version(url, units=2, rows=7, max_rows_per_file=4)
    fresh = EmbeddingStore(url)  # a new reader sees the committed version
    manifest = fresh.manifest(mid[:8])
    table = fresh.read_table(manifest)
    assert sorted(table.column("key").to_pylist()) == sorted(cols["key"])
    assert len(fresh.committed_files(manifest, "images")) == 4
    assert not fresh.fs.exists(f"{s3_bucket}/emb/{mid}/_staging")
    assert fake_model_id("m1") == mid
