"""Exact top-k (Parquet scan and memory-mapped cache) against brute force, structured filters (arrow and
parametrized DuckDB), the cache's life cycle, ANN recall."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from pipelines.search.ann import build_ann, load_ann
from pipelines.search.matrix_cache import cache_root, load_cache
from pipelines.search.query import exact_search
from pipelines.search.where import FilterError, parse_where, to_arrow, to_sql
from pipelines.store.store import StoreError, VersionWriter, build_table
from tests.store_data import image_columns, unit_vectors, write_synthetic_version


def brute_force(vecs, cols, q, k, mask=None):
    q = q / np.linalg.norm(q)
    scores = vecs @ q
    idx = np.arange(len(vecs)) if mask is None else np.flatnonzero(mask)
    order = idx[np.lexsort((idx, -scores[idx]))][:k]
    return [cols["key"][i] for i in order], scores[order]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("q") / "store")
    store, mid, vecs, cols = write_synthetic_version(url, units=4, rows=120, dim=24, max_rows_per_file=50)
    return store, store.manifest(mid), vecs, cols


@pytest.mark.parametrize("cache", [False, True], ids=["parquet-scan", "flat-cache"])
def test_exact_matches_brute_force_across_files_and_batches(synthetic, cache, monkeypatch):
    monkeypatch.setattr("pipelines.search.matrix_cache.BLOCK_ROWS", 64)  # several blocks over the 480 rows
    store, manifest, vecs, cols = synthetic
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((5, 24)).astype(np.float32)
    results = exact_search(store, manifest, queries, k=7, batch_rows=16, cache=cache)  # many small batches
    for q, hits in zip(queries, results):
        keys, scores = brute_force(vecs, cols, q, 7)
        assert [h.key for h in hits] == keys
        np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-6)
        assert [h.rank for h in hits] == list(range(1, 8))
    # metadata comes from the winner's row
    top = results[0][0]
    i = cols["key"].index(top.key)
    assert (top.source, top.split, top.class_name, top.lat) == (
        cols["source"][i],
        cols["split"][i],
        cols["class"][i],
        cols["lat"][i],
    )
    # k larger than the store returns everything once
    everything = exact_search(store, manifest, queries[0], k=10_000, cache=cache)[0]
    assert len(everything) == len(vecs) and len({h.key for h in everything}) == len(vecs)


@pytest.mark.parametrize(
    "where, predicate",
    [
        ("class = 'airport'", lambda c, i: c["class"][i] == "airport"),
        (
            "class IN ('beach', 'forest') AND split = 'test'",
            lambda c, i: c["class"][i] in ("beach", "forest") and c["split"][i] == "test",
        ),
        ("lat IS NULL OR lat > 40.5", lambda c, i: c["lat"][i] is None or c["lat"][i] > 40.5),
        (
            "NOT (class = 'airport') AND class IS NOT NULL",
            lambda c, i: c["class"][i] not in ("airport", None),
        ),
        (
            "key != 'syn__u0_0001' AND lon <= -3.2",
            lambda c, i: c["key"][i] != "syn__u0_0001" and c["lon"][i] is not None and c["lon"][i] <= -3.2,
        ),
    ],
)
@pytest.mark.parametrize("cache", [False, True], ids=["parquet-scan", "flat-cache"])
def test_filters_match_brute_force(synthetic, where, predicate, cache, monkeypatch):
    monkeypatch.setattr("pipelines.search.matrix_cache.BLOCK_ROWS", 64)
    store, manifest, vecs, cols = synthetic
    q = np.random.default_rng(5).standard_normal(24).astype(np.float32)
    mask = np.array([predicate(cols, i) for i in range(len(vecs))])
    assert 0 < mask.sum() < len(vecs)
    hits = exact_search(store, manifest, q, k=9, where=where, batch_rows=32, cache=cache)[0]
    keys, _ = brute_force(vecs, cols, q, 9, mask)
    assert [h.key for h in hits] == keys


def test_filter_sql_is_parametrized_and_agrees_with_arrow(synthetic):
    store, manifest, _, _ = synthetic
    table = store.read_table(manifest, columns=["key", "class", "split", "lat"])
    con = duckdb.connect()
    con.register("images", table)
    text = "class = 'it''s' OR (split = 'test' AND lat >= 40.1)"
    sql, params = to_sql(parse_where(text))
    assert "'" not in sql and params == ["it's", "test", 40.1]
    via_sql = {r[0] for r in con.execute(f"SELECT key FROM images WHERE {sql}", params).fetchall()}
    via_arrow = set(table.filter(to_arrow(parse_where(text))).column("key").to_pylist())
    assert via_sql == via_arrow and via_sql


@pytest.mark.parametrize(
    "bad, message",
    [
        ("class = 'a'; DROP TABLE images", "unexpected character ';'"),
        ("1 = 1", "expected a column name"),
        ("class = airport", "expected a quoted string or a number"),
        ("password = 'x'", "unknown column 'password'"),
        ("lat = 'north'", "needs a number"),
        ("class = 'a' OR", "ends early"),
        ("class LIKE 'a%'", "expected an operator"),
        ("class = 'a' -- comment", "expected a quoted string or a number|unexpected"),
        ("(class = 'a'", "ends early"),
        ("", "empty filter"),
    ],
)
def test_bad_filters_are_rejected_clearly(bad, message):
    with pytest.raises(FilterError, match=message):
        parse_where(bad)


def test_flat_cache_is_built_once_used_by_default_and_replaced_on_commit(tmp_path, monkeypatch):
    store, mid, vecs, cols = write_synthetic_version(str(tmp_path / "s"), units=2, rows=300, dim=16)
    manifest = store.manifest(mid)
    q = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    monkeypatch.setattr("pipelines.search.matrix_cache.MIN_ROWS", 1000)
    exact_search(store, manifest, q)  # 600 rows: below MIN_ROWS, the scan needs no cache
    assert load_cache(store, manifest, "images") is None
    monkeypatch.setattr("pipelines.search.matrix_cache.MIN_ROWS", 500)
    first = exact_search(store, manifest, q)[0]  # now at least MIN_ROWS: built on the first query
    cache = load_cache(store, manifest, "images")
    assert (
        cache is not None
        and cache.folder == cache_root(store, manifest, "images") / f"g{manifest.generation:06d}"
    )
    np.testing.assert_array_equal(np.asarray(cache.matrix), vecs)  # rows in manifest order == write order
    mtime = (cache.folder / "embeddings.npy").stat().st_mtime_ns
    assert [h.key for h in exact_search(store, manifest, q)[0]] == [h.key for h in first]
    assert (cache.folder / "embeddings.npy").stat().st_mtime_ns == mtime  # reused, not rebuilt
    # a commit makes a new generation: the old cache is not used, the next query builds the new one
    writer = VersionWriter(store, mid, manifest.model)
    extra = unit_vectors(5, 16, 77)
    writer.stage(
        {"id": "new/shard.tar"},
        {"images": build_table("images", image_columns(9, 5), extra, dim=16, model_id=mid)},
    )
    writer.commit()
    newer = store.manifest(mid)
    assert load_cache(store, newer, "images") is None
    top = exact_search(store, newer, extra[3])[0][0]
    assert top.key == image_columns(9, 5)["key"][3] and top.score == pytest.approx(1.0, abs=1e-5)
    assert sorted(p.name for p in cache_root(store, newer, "images").iterdir()) == [
        f"g{newer.generation:06d}"
    ]  # stale one gone


def test_flat_cache_of_a_remote_store_is_local(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SSJDN_CACHE_DIR", str(tmp_path / "cache"))
    store, mid, vecs, cols = write_synthetic_version(f"s3://{s3_bucket}/emb", units=2, rows=40, dim=8)
    manifest = store.manifest(mid)
    q = vecs[17] + 0.01
    streamed = exact_search(store, manifest, q, k=5, cache=False)[0]
    cached = exact_search(store, manifest, q, k=5, cache=True)[0]
    assert [(h.key, h.source) for h in cached] == [(h.key, h.source) for h in streamed]
    folder = load_cache(store, manifest, "images").folder
    assert folder.is_relative_to(tmp_path / "cache") and (folder / "meta.json").exists()
    assert not store.fs.exists(f"{s3_bucket}/emb/{mid}/_flat")  # nothing written into the store


def test_ann_recall_reported_and_stale_after_commit(tmp_path):
    store, mid, vecs, cols = write_synthetic_version(str(tmp_path / "s"), units=2, rows=1000, dim=32)
    manifest = store.manifest(mid)
    assert load_ann(store, manifest) is None
    ann = build_ann(store, manifest, recall_queries=50)
    assert ann.meta["recall@10"] >= 0.9 and ann.meta["rows"] == 2000
    loaded = load_ann(store, manifest)
    assert loaded is not None and loaded.meta["recall@10"] == ann.meta["recall@10"]
    # ANN hits on a stored vector: itself first, with the right metadata
    target = 1234
    rows, scores = loaded.search(vecs[target], 10)
    hits = loaded.hits(store, rows[0], scores[0])
    assert hits[0].key == cols["key"][target] and hits[0].score == pytest.approx(1.0, abs=2e-3)
    # committing another unit makes the index stale: queries must not use it
    writer = VersionWriter(store, mid, manifest.model)
    t = build_table("images", image_columns(5, 3), unit_vectors(3, 32, 5), dim=32, model_id=mid)
    writer.stage({"id": "new/shard.tar"}, {"images": t})
    writer.commit()
    assert load_ann(store, store.manifest(mid)) is None


def test_query_dimension_and_empty_table_errors(synthetic, tmp_path):
    store, manifest, _, _ = synthetic
    with pytest.raises(StoreError, match="dimension 8 .* 24-d"):
        exact_search(store, manifest, np.ones(8, np.float32))
    with pytest.raises(StoreError, match="no committed captions"):
        exact_search(store, manifest, np.ones(24, np.float32), table="captions")
    assert isinstance(store.read_table(manifest, "captions"), pa.Table)


def test_flat_cache_falls_back_to_the_scan_when_it_cannot_be_written(tmp_path, monkeypatch):
    store, mid, vecs, cols = write_synthetic_version(str(tmp_path / "s"), units=1, rows=200, dim=8)
    manifest = store.manifest(mid)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should go")
    monkeypatch.setattr("pipelines.search.matrix_cache.cache_root", lambda *a: blocker / "flat")
    q = vecs[42]
    hits = exact_search(store, manifest, q, k=3, cache=True)[0]  # asked for but cannot be written: scanned
    assert hits[0].key == cols["key"][42]
