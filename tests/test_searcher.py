"""The warm `Searcher`: exact results equal brute force over the snapshot's files whatever holds the matrix,
batches equal single queries, a new generation is picked up between queries (never mid-query) without reading
the store per query, read-only mode writes nothing into the store, ANN recall, encoders loaded once, limits."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.search import searcher as searcher_mod
from pipelines.search.searcher import ImageTooLargeError, NotAnImageError, Query, Searcher, SearchError
from pipelines.search.where import FilterError
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter
from tests.serve_support import bomb_png, brute_force, shared_model_store, snapshot_arrays
from tests.store_data import fake_model_id, image_columns, unit_vectors, write_synthetic_version

DIM = 24


def snapshot_meta(url: str, column: str) -> list:
    snap = EmbeddingStore(url).snapshot()
    return [v for p in snap.paths("images") for v in pq.read_table(p, columns=[column]).column(0).to_pylist()]


def listing(root) -> dict[str, tuple[int, int]]:
    from pathlib import Path

    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*") if p.is_file()}


def commit_unit(
    url: str, unit: int, rows: int = 30, seed: int = 99, model: str = "m1"
) -> tuple[list[str], np.ndarray]:
    """Commit one more unit (a nightly re-index) into a synthetic version; returns its keys and vectors."""
    store = EmbeddingStore(url)
    mid = fake_model_id(model)
    writer = VersionWriter(
        store, mid, {"dim": DIM, "dtype": "float32", "config": "synthetic"}, max_rows_per_file=50
    )
    cols = image_columns(unit, rows)
    cols["key"] = [f"new{unit}__{k}" for k in cols["key"]]
    vecs = unit_vectors(rows, DIM, seed)
    writer.stage(
        {"id": f"test/shard-{unit:06d}.tar", "bad": []},
        {"images": build_table("images", cols, vecs, dim=DIM, model_id=mid)},
    )
    writer.commit()
    writer.close()
    return cols["key"], vecs


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("searcher") / "store")
    write_synthetic_version(url, units=4, rows=120, dim=DIM, max_rows_per_file=50)
    keys, vecs = snapshot_arrays(url)
    return url, keys, vecs


ENGINES = {
    "memory": ({"read_only": True}, "memory"),
    "local-matrix-cache": ({"read_only": True}, "local matrix cache"),  # IN_MEMORY_BYTES = 0
    "store-matrix-cache": ({"read_only": False, "cache": True}, "store matrix cache"),
    "parquet-scan": ({"read_only": True, "cache": False}, "scan"),
}


@pytest.mark.parametrize("engine", ENGINES)
def test_exact_equals_brute_force_over_the_snapshot_files(syn, engine, tmp_path, monkeypatch):
    url, keys, vecs = syn
    kwargs, kind = ENGINES[engine]
    if engine == "local-matrix-cache":
        monkeypatch.setattr(searcher_mod, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr("pipelines.search.matrix_cache.BLOCK_ROWS", 64)  # several blocks over the 480 rows
    classes = np.array(snapshot_meta(url, "class"), dtype=object)
    with Searcher(url, load_encoders=False, cache_dir=tmp_path / "cache", **kwargs) as s:
        assert s.status()["tables"]["images"]["exact"] == kind
        queries = np.random.default_rng(3).standard_normal((6, DIM)).astype(np.float32)
        for q in queries:
            found = s.search(vector=q, k=7)
            want, scores = brute_force(keys, vecs, q, 7)
            assert [h.key for h in found.hits] == want and found.mode == "exact"
            np.testing.assert_allclose([h.score for h in found.hits], scores, atol=1e-6, rtol=0)
            filtered = s.search(vector=q, k=5, where="class = 'airport'")
            want, scores = brute_force(keys, vecs, q, 5, mask=classes == "airport")
            assert [h.key for h in filtered.hits] == want
            np.testing.assert_allclose([h.score for h in filtered.hits], scores, atol=1e-6, rtol=0)
        everything = s.search(vector=queries[0], k=10_000)
        assert len(everything.hits) == len(keys) == len({h.key for h in everything.hits})
        # a batch (mixed k, filters and tables of one kind) answers exactly what single queries answer
        batch = [
            Query(vector=queries[0], k=3),
            Query(vector=queries[1], k=9),
            Query(vector=queries[2], k=4, where="split = 'test'"),
        ]
        together = s.search_many(batch)
        alone = [s.search_many([q])[0] for q in batch]
        assert [[h.key for h in r.hits] for r in together] == [[h.key for h in r.hits] for r in alone]
        assert [r.timings["batch"] for r in together] == [2, 2, 1]


def test_read_only_writes_nothing_into_the_store(tmp_path, monkeypatch):
    url = str(tmp_path / "store")  # a store without a matrix cache of its own
    write_synthetic_version(url, units=4, rows=120, dim=DIM, max_rows_per_file=50)
    monkeypatch.setattr(searcher_mod, "IN_MEMORY_BYTES", 0)  # the matrix goes to a local cache file
    before = listing(url)
    with Searcher(url, load_encoders=False, read_only=True, ann=True, cache_dir=tmp_path / "cache") as s:
        q = np.ones(DIM, np.float32)
        assert s.search(vector=q, k=5).mode == "ann"
        s.search(vector=q, k=5, where="split = 'train'")
        assert s.item(s.search(vector=q, k=1).hits[0].key) is not None
    assert listing(url) == before
    made = {p.split("/cache/")[1].split("/", 3)[-1] for p in listing(tmp_path / "cache")}
    assert {
        "flat/g000001/embeddings.npy",
        "flat/g000001/meta.json",
        "ann/g000001/index.usearch",
        "ann/g000001/meta.json",
    } <= made
    # a second searcher reuses the local caches instead of building them again
    with Searcher(url, load_encoders=False, read_only=True, ann=True, cache_dir=tmp_path / "cache") as s:
        table = s.status()["tables"]["images"]
        assert (table["rows"], table["exact"], table["ann"]) == (480, "local matrix cache", "ready")


def test_ann_recall_is_measured_and_filters_search_exactly(syn, tmp_path):
    url, keys, vecs = syn
    with Searcher(url, load_encoders=False, read_only=True, ann=True, cache_dir=tmp_path / "cache") as s:
        recall_at_build = s.status()["tables"]["images"]["ann_recall"]["recall@10"]
        assert recall_at_build >= 0.9
        queries = np.random.default_rng(8).standard_normal((30, DIM)).astype(np.float32)
        results = s.search_many([Query(vector=q, k=10) for q in queries])
        assert {r.mode for r in results} == {"ann"} and results[0].ann["recall@10"] == recall_at_build
        recall = np.mean(
            [
                len({h.key for h in r.hits} & set(brute_force(keys, vecs, q, 10)[0])) / 10
                for r, q in zip(results, queries)
            ]
        )
        assert recall >= 0.9
        filtered = s.search(vector=queries[0], k=5, where="class = 'beach'")
        assert filtered.mode == "exact" and "where filter" in filtered.note
        assert s.search(vector=queries[0], k=5, ann=False).mode == "exact"


def test_a_new_generation_is_picked_up_between_queries_never_mid_query(tmp_path):
    url = str(tmp_path / "store")
    write_synthetic_version(url, units=2, rows=40, dim=DIM)
    s = Searcher(url, load_encoders=False, read_only=True, refresh_s=None, cache_dir=tmp_path / "cache")
    assert s.generation == 1
    new_keys, new_vecs = commit_unit(url, 7)
    assert s.search(vector=new_vecs[0], k=1).generation == 1  # refresh_s=None: only refresh() switches
    assert s.refresh() is True and s.generation == 2 and s.refresh() is False
    top = s.search(vector=new_vecs[0], k=1)
    assert top.generation == 2 and top.hits[0].key == new_keys[0]

    # A switch while a query runs: the query finishes on the generation it started on.
    real_hits = s._hits
    switched = {}

    def hits_then_switch(t, per_query):
        if not switched:
            switched["keys"], switched["vecs"] = commit_unit(url, 8, seed=5)
            switched["did"] = s.refresh()
        return real_hits(t, per_query)

    s._hits = hits_then_switch
    during = s.search(vector=np.ones(DIM, np.float32), k=500)
    s._hits = real_hits
    assert switched["did"] and during.generation == 2 and len(during.hits) == 80 + 30
    assert not any(h.key.startswith("new8__") for h in during.hits)
    after = s.search(vector=switched["vecs"][0], k=1)
    assert after.generation == 3 and after.hits[0].key == switched["keys"][0]
    s.close()


def test_queries_do_not_read_the_store_and_the_watcher_switches_alone(tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    write_synthetic_version(url, units=2, rows=40, dim=DIM)
    reads = []
    real = EmbeddingStore.read_manifest
    monkeypatch.setattr(
        EmbeddingStore, "read_manifest", lambda self, mid: reads.append(mid) or real(self, mid)
    )
    with Searcher(url, load_encoders=False, read_only=True, refresh_s=3600, cache_dir=tmp_path / "c") as s:
        reads.clear()
        for _ in range(20):
            s.search(vector=np.ones(DIM, np.float32), k=3)
        assert reads == []  # not one store read in 20 queries (the metadata of the winners aside)
    with Searcher(url, load_encoders=False, read_only=True, refresh_s=0.05, cache_dir=tmp_path / "c") as s:
        s.watch()
        keys, vecs = commit_unit(url, 9)
        deadline = time.monotonic() + 30
        while s.generation == 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.generation == 2 and s.search(vector=vecs[3], k=1).hits[0].key == keys[3]


def test_query_errors_are_clear(syn, tmp_path):
    with Searcher(syn[0], load_encoders=False, read_only=True, cache_dir=tmp_path) as s:
        q = np.ones(DIM, np.float32)
        for kwargs, message in [
            ({}, "exactly one of text, image or vector"),
            ({"vector": q, "text": "a"}, "exactly one of"),
            ({"vector": q, "k": 0}, "k must be"),
            ({"vector": np.ones(DIM + 1)}, "has 25 values"),
            ({"vector": np.zeros(DIM)}, "zero"),
            ({"vector": q, "table": "captions"}, "no committed captions"),
            ({"vector": q, "table": "nope"}, "table must be one of"),
            ({"text": "a beach"}, "without encoders"),
        ]:
            with pytest.raises(SearchError, match=message):
                s.search(**kwargs)
        with pytest.raises(FilterError, match="unknown column"):
            s.search(vector=q, where="colour = 'red'")


# ---------------------------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def model_store():
    return shared_model_store()


def test_text_queries_equal_query_store_and_load_the_model_once(model_store, monkeypatch):
    import pipelines.encoders as encoders
    from pipelines.search.query import query_store

    reads = []
    real = encoders.read_checkpoint
    monkeypatch.setattr(encoders, "read_checkpoint", lambda *a, **k: reads.append(a) or real(*a, **k))
    with Searcher(model_store["store"], read_only=True, cache_dir=model_store["root"] / "cache") as s:
        assert len(reads) == 1
        texts = ["a beach with waves", "many planes parked near a terminal", "dense green forest"]
        warm = [s.search(text=t, k=5) for t in texts]
        assert len(reads) == 1  # no reload per query
        batched = s.search_many([Query(text=t, k=5) for t in texts])
        for t, w, b in zip(texts, warm, batched):
            cold = query_store(model_store["store"], text=t, k=5)
            assert [h.key for h in w.hits] == [h.key for h in cold.hits] == [h.key for h in b.hits]
            np.testing.assert_allclose([h.score for h in w.hits], [h.score for h in cold.hits], atol=1e-6)
        assert len(reads) == 1 + len(texts)  # each cold call read the checkpoint again
        # a text asked again (another k, a filter) is not encoded again
        calls = []
        real_encode = s.encoders.encode_texts
        s.encoders.encode_texts = lambda batch, **kw: calls.append(list(batch)) or real_encode(batch, **kw)
        again = s.search(text=texts[1], k=2, where="split = 'train'")
        fresh = s.search(text="a text never asked", k=2)
        s.encoders.encode_texts = real_encode
        assert calls == [["a text never asked"]] and again.hits and fresh.hits
        caps = s.search(text=texts[0], k=3, table="captions")
        assert caps.table == "captions" and all(h.extra["caption"] for h in caps.hits)


def test_image_queries_and_image_limits(model_store):
    from PIL import Image

    image = model_store["images"][0]
    key = f"synthetic__{image.stem}"
    with Searcher(model_store["store"], read_only=True, cache_dir=model_store["root"] / "cache") as s:
        for given in (image.read_bytes(), str(image), Image.open(image)):
            top = s.search(image=given, k=2).hits[0]
            assert top.key == key and top.score == pytest.approx(1.0, abs=1e-5)
        t0 = time.perf_counter()
        with pytest.raises(ImageTooLargeError, match="over the limit of 40000000 pixels"):
            s.search(image=bomb_png(), k=2)
        assert time.perf_counter() - t0 < 10  # refused from the header, never decoded
        with pytest.raises(NotAnImageError, match="not a recognised image"):
            s.search(image=b"%PDF-1.4 not an image", k=2)
        with pytest.raises(SearchError, match="empty"):
            s.search(text="   ", k=2)


def test_a_checkpoint_of_another_model_is_refused(model_store, tmp_path):
    from pipelines.encoders import CheckpointError
    from tests.embed_helpers import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other.pt", ["a b c"], seed=5)
    with pytest.raises(CheckpointError, match="must be encoded by the model that embedded the store"):
        Searcher(model_store["store"], checkpoint=str(other), read_only=True, cache_dir=tmp_path)


def test_a_new_generation_gets_its_own_ann_index(tmp_path):
    url = str(tmp_path / "store")
    write_synthetic_version(url, units=2, rows=60, dim=DIM)
    with Searcher(
        url, load_encoders=False, read_only=True, ann=True, refresh_s=None, cache_dir=tmp_path / "c"
    ) as s:
        assert s.search(vector=np.ones(DIM, np.float32), k=3).mode == "ann"
        keys, vecs = commit_unit(url, 5)
        assert s.refresh()
        first = s.search(vector=vecs[0], k=3)  # answered at once: exactly while the index builds, or by it
        assert first.generation == 2 and first.hits[0].key == keys[0]
        assert first.mode == "ann" or "ANN index is building" in first.note
        assert s.wait_for_ann(60)
        after = s.search(vector=vecs[0], k=3)
        assert (after.mode, after.generation, after.hits[0].key) == ("ann", 2, keys[0])
        assert sorted(p.name for p in (tmp_path / "c").rglob("g*") if p.parent.name == "ann") == ["g000002"]
