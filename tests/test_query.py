"""Exact top-k (Parquet scan and memory-mapped cache) and ANN against brute force over a snapshot's files,
structured filters (arrow and parametrized DuckDB), the cache's life cycle, ANN recall, corrupt files."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.search.ann import build_ann, load_ann
from pipelines.search.exact import exact_search
from pipelines.search.matrix_cache import cache_root, load_cache
from pipelines.search.results import hits
from pipelines.search.where import FilterError, parse_where, to_arrow, to_sql
from pipelines.store import reader
from pipelines.store.reader import forget_verified_files
from pipelines.store.schema import StoreError, build_table, embeddings_to_numpy
from pipelines.store.writer import VersionWriter
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
    return store, store.snapshot(mid), vecs, cols


@pytest.mark.parametrize("cache", [False, True], ids=["parquet-scan", "flat-cache"])
def test_exact_matches_brute_force_across_files_and_batches(synthetic, cache, monkeypatch):
    monkeypatch.setattr("pipelines.search.matrix_cache.BLOCK_ROWS", 64)  # several blocks over the 480 rows
    snapshot, vecs, cols = synthetic[1:]
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((5, 24)).astype(np.float32)
    results = exact_search(snapshot, queries, k=7, batch_rows=16, cache=cache)  # many small batches
    for q, found in zip(queries, results):
        keys, scores = brute_force(vecs, cols, q, 7)
        assert [h.key for h in found] == keys
        np.testing.assert_allclose([h.score for h in found], scores, rtol=1e-5, atol=1e-6)
        assert [h.rank for h in found] == list(range(1, 8))
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
    everything = exact_search(snapshot, queries[0], k=10_000, cache=cache)[0]
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
    snapshot, vecs, cols = synthetic[1:]
    q = np.random.default_rng(5).standard_normal(24).astype(np.float32)
    mask = np.array([predicate(cols, i) for i in range(len(vecs))])
    assert 0 < mask.sum() < len(vecs)
    hits = exact_search(snapshot, q, k=9, where=where, batch_rows=32, cache=cache)[0]
    keys, _ = brute_force(vecs, cols, q, 9, mask)
    assert [h.key for h in hits] == keys


def test_filter_sql_is_parametrized_and_agrees_with_arrow(synthetic):
    snapshot = synthetic[1]
    table = snapshot.read_table(columns=["key", "class", "split", "lat"])
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


def test_matrix_cache_is_built_once_used_by_default_and_replaced_on_commit(tmp_path, monkeypatch):
    store, mid, vecs, cols = write_synthetic_version(str(tmp_path / "s"), units=2, rows=300, dim=16)
    snapshot = store.snapshot(mid)
    q = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    monkeypatch.setattr("pipelines.search.matrix_cache.MIN_ROWS", 1000)
    exact_search(snapshot, q)  # 600 rows: below MIN_ROWS, the scan needs no cache
    assert load_cache(snapshot, "images") is None
    monkeypatch.setattr("pipelines.search.matrix_cache.MIN_ROWS", 500)
    first = exact_search(snapshot, q)[0]  # now at least MIN_ROWS: built on the first query
    cache = load_cache(snapshot, "images")
    assert cache is not None
    assert cache.folder == cache_root(snapshot, "images") / f"g{snapshot.generation:06d}"
    np.testing.assert_array_equal(np.asarray(cache.matrix), vecs)  # global rows == write order
    mtime = (cache.folder / "embeddings.npy").stat().st_mtime_ns
    assert [h.key for h in exact_search(snapshot, q)[0]] == [h.key for h in first]
    assert (cache.folder / "embeddings.npy").stat().st_mtime_ns == mtime  # reused, not rebuilt
    # a commit makes a new generation: the old cache is not used, the next query builds the new one
    writer = VersionWriter(store, mid, snapshot.model)
    extra = unit_vectors(5, 16, 77)
    writer.stage(
        {"id": "new/shard.tar"},
        {"images": build_table("images", image_columns(9, 5), extra, dim=16, model_id=mid)},
    )
    writer.commit()
    newer = store.snapshot(mid)
    assert load_cache(newer, "images") is None
    top = exact_search(newer, extra[3])[0][0]
    assert top.key == image_columns(9, 5)["key"][3] and top.score == pytest.approx(1.0, abs=1e-5)
    assert sorted(p.name for p in cache_root(newer, "images").iterdir()) == [
        f"g{newer.generation:06d}"
    ]  # stale one gone


def test_matrix_cache_of_a_remote_store_is_local(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SSJDN_CACHE_DIR", str(tmp_path / "cache"))
    store, mid, vecs, cols = write_synthetic_version(f"s3://{s3_bucket}/emb", units=2, rows=40, dim=8)
    snapshot = store.snapshot(mid)
    q = vecs[17] + 0.01
    streamed = exact_search(snapshot, q, k=5, cache=False)[0]
    cached = exact_search(snapshot, q, k=5, cache=True)[0]
    assert [(h.key, h.source) for h in cached] == [(h.key, h.source) for h in streamed]
    folder = load_cache(snapshot, "images").folder
    assert folder.is_relative_to(tmp_path / "cache") and (folder / "meta.json").exists()
    assert not store.fs.exists(f"{s3_bucket}/emb/{mid}/_flat")  # nothing written into the store


def test_ann_recall_reported_and_stale_after_commit(tmp_path):
    store, mid, vecs, cols = write_synthetic_version(str(tmp_path / "s"), units=2, rows=1000, dim=32)
    snapshot = store.snapshot(mid)
    assert load_ann(snapshot) is None
    ann = build_ann(snapshot, recall_queries=50)
    assert ann.meta["recall@10"] >= 0.9 and ann.meta["rows"] == 2000
    loaded = load_ann(snapshot)
    assert loaded is not None and loaded.meta["recall@10"] == ann.meta["recall@10"]
    # ANN hits on a stored vector: itself first, with the right metadata
    target = 1234
    rows, scores = loaded.search(vecs[target], 10)
    found = hits(snapshot, "images", rows[0], scores[0])
    assert found[0].key == cols["key"][target] and found[0].score == pytest.approx(1.0, abs=2e-3)
    # committing another unit makes the index stale: queries must not use it
    writer = VersionWriter(store, mid, snapshot.model)
    t = build_table("images", image_columns(5, 3), unit_vectors(3, 32, 5), dim=32, model_id=mid)
    writer.stage({"id": "new/shard.tar"}, {"images": t})
    writer.commit()
    assert load_ann(store.snapshot(mid)) is None


def test_query_dimension_and_empty_table_errors(synthetic, tmp_path):
    snapshot = synthetic[1]
    with pytest.raises(StoreError, match="dimension 8 .* 24-d"):
        exact_search(snapshot, np.ones(8, np.float32))
    with pytest.raises(StoreError, match="no committed captions"):
        exact_search(snapshot, np.ones(24, np.float32), table="captions")
    assert isinstance(snapshot.read_table("captions"), pa.Table)


def test_matrix_cache_falls_back_to_the_scan_when_it_cannot_be_written(tmp_path, monkeypatch):
    store, mid, vecs, cols = write_synthetic_version(str(tmp_path / "s"), units=1, rows=200, dim=8)
    snapshot = store.snapshot(mid)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should go")
    monkeypatch.setattr("pipelines.search.matrix_cache.cache_root", lambda *a: blocker / "flat")
    q = vecs[42]
    found = exact_search(snapshot, q, k=3, cache=True)[0]  # asked for but cannot be written: scanned
    assert found[0].key == cols["key"][42]


def test_exact_cached_and_ann_agree_with_brute_force_over_the_snapshot_files(tmp_path, monkeypatch):
    """Acceptance (issue 13): on a fixed store, exact scan, cached matrix and ANN give the same keys in the same
    order as a numpy top-k over the snapshot's committed files, scores within 1e-6."""
    monkeypatch.setattr("pipelines.search.matrix_cache.BLOCK_ROWS", 500)  # several blocks
    store, mid, _, _ = write_synthetic_version(
        str(tmp_path / "s"), units=3, rows=700, dim=32, max_rows_per_file=300, seed=11
    )
    snapshot = store.snapshot(mid)
    assert len(snapshot.paths("images")) == 9
    files = [pq.read_table(p, columns=["key", "embedding"]) for p in snapshot.paths("images")]
    keys = [k for t in files for k in t.column("key").to_pylist()]
    matrix = np.concatenate([embeddings_to_numpy(t.column("embedding")) for t in files])
    queries = np.random.default_rng(5).standard_normal((8, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = 10
    truth = []
    for q in queries:
        scores = matrix @ q
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        truth.append(([keys[i] for i in order], scores[order]))
    ann = build_ann(snapshot, dtype="f32", expansion_search=4096, recall_queries=20)
    rows, scores = ann.search(queries, k)
    engines = {
        "scan": exact_search(snapshot, queries, k=k, cache=False, batch_rows=128),
        "cache": exact_search(snapshot, queries, k=k, cache=True),
    }
    for name, results in engines.items():
        for (want_keys, want_scores), found in zip(truth, results):
            assert [h.key for h in found] == want_keys, name
            np.testing.assert_allclose([h.score for h in found], want_scores, rtol=0, atol=1e-6, err_msg=name)
    # ANN is approximate and usearch builds its graph with several threads (not reproducible): its hits must be
    # exact-search hits in exact order with exact scores, and (with this wide search) nearly all of them.
    ann_hits = [hits(snapshot, "images", r, s) for r, s in zip(rows, scores)]
    found_total = 0
    for (want_keys, want_scores), found in zip(truth, ann_hits):
        rank = {key: i for i, key in enumerate(want_keys)}
        kept = [h for h in found if h.key in rank]
        assert [rank[h.key] for h in kept] == sorted(rank[h.key] for h in kept)
        np.testing.assert_allclose([h.score for h in kept], [want_scores[rank[h.key]] for h in kept], atol=1e-6)
        found_total += len(kept)
    assert found_total / (k * len(queries)) >= 0.95


def _overwrite(path, offset: int, n: int = 200) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset : offset + n] = bytes((b + 1) % 256 for b in data[offset : offset + n])
    open(path, "wb").write(bytes(data))


def test_a_corrupt_file_fails_the_query_naming_it(tmp_path, monkeypatch):
    """Issue 19: 200 bytes overwritten in a committed Parquet file (size unchanged): the scan, the matrix cache
    build and the ANN build fail naming the file; nothing is hashed twice in one process and generation."""
    monkeypatch.setenv("SSJDN_CACHE_DIR", str(tmp_path / "cache"))
    store, mid, vecs, _ = write_synthetic_version(str(tmp_path / "s"), units=2, rows=300, dim=16)
    snapshot = store.snapshot(mid)
    q = vecs[7]
    hashed = []
    real = reader.sha256_of
    monkeypatch.setattr(reader, "sha256_of", lambda fs, path: hashed.append(path) or real(fs, path))
    for _ in range(3):  # verified once per process and generation, not on every query
        assert exact_search(snapshot, q, k=3, cache=False)[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert sorted(hashed) == sorted(snapshot.paths("images"))
    bad = snapshot.paths("images")[1]
    _overwrite(bad, len(open(bad, "rb").read()) // 2)
    # a new process checks it when first read, and always before building a cache or an index on it
    forget_verified_files()
    name = bad.rsplit("/", 1)[1]
    for search in (
        lambda: exact_search(snapshot, q, k=3, cache=False),
        lambda: exact_search(snapshot, q, k=3, cache=True),
        lambda: build_ann(snapshot, recall_queries=5),
    ):
        with pytest.raises(StoreError, match=f"{name}.*corrupt"):
            search()
    assert load_cache(snapshot, "images") is None and load_ann(snapshot) is None


def test_a_corrupt_page_read_for_the_winners_metadata_fails_naming_the_file(tmp_path):
    """With a matrix cache the embeddings are not read again; the winners' metadata is, and Parquet's page CRCs
    catch damage in what is read (without hashing the whole file on every query)."""
    store, mid, vecs, _ = write_synthetic_version(str(tmp_path / "s"), units=2, rows=300, dim=16)
    snapshot = store.snapshot(mid)
    assert exact_search(snapshot, vecs[400], k=1, cache=True)[0][0].key  # builds the cache from clean files
    forget_verified_files()  # a new process
    winner_file = snapshot.table_files("images")[1]
    md = pq.read_metadata(winner_file.path)
    column = md.row_group(0).column(md.schema.names.index("key"))
    _overwrite(winner_file.path, (column.dictionary_page_offset or column.data_page_offset) + 4)
    name = winner_file.path.rsplit("/", 1)[1]
    with pytest.raises(StoreError, match=name):
        exact_search(snapshot, vecs[400], k=1, cache=True)
