"""Embedding store: schema, bounded files, the snapshot API (global rows, checksums), the commit protocol
(staged files invisible, dead runs' leftovers cleared, live ones kept), concurrent writers (in process, and
two real processes on local disk and on S3), versions, bad manifests."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.store.manifest import ManifestConflict, read_for_update, write_manifest
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import StoreError, build_table, embeddings_to_numpy, table_schema
from pipelines.store.writer import VersionWriter
from tests.conftest import REPO
from tests.store_data import (
    committed_version,
    fake_model_id,
    image_columns,
    is_embedding_type,
    unit_tables,
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
    snapshot = store.snapshot()
    files = snapshot.paths("images")
    assert len(files) == 9  # 50 rows per unit in files of at most 20: 20 + 20 + 10
    for path in files:
        meta = pq.read_metadata(path)
        assert meta.num_rows <= 20
        assert is_embedding_type(pq.read_schema(path).field("embedding").type, 16, pa.float32())
    table = snapshot.read_table()
    assert table.schema.equals(table_schema("images", 16))
    got = dict(zip(table.column("key").to_pylist(), embeddings_to_numpy(table.column("embedding"))))
    for key, v in zip(cols["key"], vecs):
        np.testing.assert_array_equal(got[key], v)
    norms = np.linalg.norm(embeddings_to_numpy(table.column("embedding")), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    # nullable geo columns stay null, not NaN
    assert table.column("lat").null_count == 30 and table.column("class").null_count > 0
    assert set(table.column("model_id").to_pylist()) == {mid}


def test_snapshot_lists_files_with_rows_and_checksums_and_streams_by_global_row(tmp_path):
    store, mid, vecs, cols = write_synthetic_version(
        str(tmp_path / "s"), units=3, rows=30, max_rows_per_file=12
    )
    snapshot = store.snapshot(mid[:10])
    assert (snapshot.model_id, snapshot.generation, snapshot.dim) == (mid, 1, 16)
    files = snapshot.table_files("images")
    assert [f.rows for f in files] == [12, 12, 6] * 3 and snapshot.rows("images") == 90
    assert [f.first_row for f in files] == list(np.cumsum([0] + [f.rows for f in files])[:-1])
    assert snapshot.row_offsets("images").tolist() == [f.first_row for f in files] + [90]
    for f in files:  # the recorded checksum and size are the file's
        data = open(f.path, "rb").read()
        assert (f.sha256, f.size) == (hashlib.sha256(data).hexdigest(), len(data))
    # streaming by global row: the same rows, in the same order, as the files read one after another
    direct = np.concatenate(
        [
            embeddings_to_numpy(pq.read_table(p, columns=["embedding"]).column(0))
            for p in snapshot.paths("images")
        ]
    )
    streamed = np.empty_like(direct)
    for start, m in snapshot.iter_embeddings("images", batch_rows=5):
        streamed[start : start + len(m)] = m
    np.testing.assert_array_equal(streamed, direct)
    keys = pa.concat_tables([pq.read_table(p, columns=["key"]) for p in snapshot.paths("images")])
    keys = keys.column("key").to_pylist()
    want = [89, 0, 13, 12, 50, 13]  # any order, repeats, across files
    assert snapshot.take("images", want, ["key", "class"]).column("key").to_pylist() == [
        keys[i] for i in want
    ]
    assert snapshot.rows("captions") == 0 and snapshot.read_table("captions").num_rows == 0


def test_float16_store(tmp_path):
    store, _, vecs, cols = write_synthetic_version(str(tmp_path / "s"), units=1, rows=10, dtype="float16")
    table = store.snapshot().read_table()
    assert is_embedding_type(table.schema.field("embedding").type, 16, pa.float16())
    got = embeddings_to_numpy(table.column("embedding"))
    order = np.argsort(cols["key"])
    np.testing.assert_allclose(got, vecs[order], atol=2e-3)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staged_units_are_invisible_until_commit_and_only_dead_runs_are_cleared(tmp_path):
    url = str(tmp_path / "store")
    store, mid, _, _ = write_synthetic_version(url, units=1, rows=5)
    staging = tmp_path / "store" / mid / "_staging"
    writer = VersionWriter(store, mid, {"dim": 16, "dtype": "float32"})
    t = build_table("images", image_columns(7, 5), unit_vectors(5, 16, 7), dim=16, model_id=mid)
    writer.stage({"id": "test/shard-000007.tar"}, {"images": t})
    # staged but not committed: a reader still sees exactly the first unit
    assert store.snapshot().read_table().num_rows == 5
    assert len(list(staging.rglob("*.parquet"))) == 1
    # another writer leaves a live run's staging alone...
    other = VersionWriter(store, mid, {"dim": 16, "dtype": "float32"})
    other.remove_stale_staging()
    assert len(list(staging.rglob("*.parquet"))) == 1
    # ...and clears it once that run is dead (its process gone: the re-run after a kill)
    lease = staging / f"{writer.run_id}.lease.json"
    lease.write_text(json.dumps({**json.loads(lease.read_text()), "pid": _dead_pid()}))
    rerun = VersionWriter(store, mid, {"dim": 16, "dtype": "float32"})
    rerun.remove_stale_staging()
    assert not staging.exists()
    rerun.stage({"id": "test/shard-000007.tar"}, {"images": t})
    assert rerun.commit() == 1
    rerun.close()
    assert store.snapshot().read_table().num_rows == 10
    assert store.snapshot().generation == 2 and not staging.exists()


def test_unlisted_files_are_not_read(tmp_path):
    """A file at a final name that the manifest does not list (killed between move and manifest) is ignored."""
    store, mid, _, _ = write_synthetic_version(str(tmp_path / "store"), units=1, rows=5)
    stray = tmp_path / "store" / mid / "images" / "part-stray-0000.parquet"
    t = build_table("images", image_columns(9, 3), unit_vectors(3, 16, 9), dim=16, model_id=mid)
    pq.write_table(t, stray)
    assert store.snapshot().read_table().num_rows == 5


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


def test_a_replaced_unit_swaps_its_files_in_one_commit_and_old_files_outlive_readers(tmp_path):
    """A changed unit's new rows replace its old ones in the same manifest update; readers of the older
    generation still read the old files; a later commit past the grace period deletes them; a second writer
    replacing the same entry after the first one is dropped, not committed twice."""
    from pipelines.store.writer import replacement_token

    store = EmbeddingStore(str(tmp_path / "store"))
    mid = fake_model_id("replace")
    model = {"dim": 16, "dtype": "float32"}
    first = VersionWriter(store, mid, model)
    first.stage({"id": "a.tar", "fingerprint": "v1"}, unit_tables(mid, 4, 1))
    first.stage({"id": "b.tar", "fingerprint": "b1"}, unit_tables(mid, 2, 2))
    first.commit()
    first.close()
    old = store.snapshot(mid)
    old_paths = {f["path"] for f in store.manifest(mid).files if f["unit"] == "a.tar"}
    prior = store.manifest(mid).unit_map()["a.tar"]

    again = VersionWriter(store, mid, model, retire_grace_s=3600)
    late = VersionWriter(store, mid, model)  # saw the same entry, replaces it after `again` did
    again.stage(
        {"id": "a.tar", "fingerprint": "v2"}, unit_tables(mid, 3, 7), replaces=replacement_token(prior)
    )
    late.stage(
        {"id": "a.tar", "fingerprint": "v2"}, unit_tables(mid, 3, 7), replaces=replacement_token(prior)
    )
    assert again.commit() == 1 and again.replaced == ["a.tar"]
    assert late.commit() == 0 and late.superseded == ["a.tar"] and late.replaced == []
    manifest = store.manifest(mid)
    a_files = [f for f in manifest.files if f["unit"] == "a.tar"]
    assert {f["path"] for f in a_files}.isdisjoint(old_paths) and sum(f["rows"] for f in a_files) == 3
    assert manifest.unit_map()["a.tar"]["fingerprint"] == "v2" and manifest.rows("images") == 5
    assert {r["path"] for r in manifest.retired} == old_paths
    new_keys = store.snapshot(mid).read_table(columns=["key"]).column("key").to_pylist()
    assert sorted(new_keys) == sorted(image_columns(7, 3)["key"] + image_columns(2, 2)["key"])
    # A reader still on the old generation reads the old rows (files kept, checksums intact).
    assert sorted(old.read_table(columns=["key"]).column("key").to_pylist()) == sorted(
        image_columns(1, 4)["key"] + image_columns(2, 2)["key"]
    )
    # Past the grace period, the next commit deletes the retired files (and only those).
    gc = VersionWriter(store, mid, model, retire_grace_s=0)
    gc.stage({"id": "c.tar", "fingerprint": "c1"}, unit_tables(mid, 2, 3))
    gc.commit()
    gc.close()
    assert store.manifest(mid).retired == []
    version = tmp_path / "store" / mid
    assert not any((version / p).exists() for p in old_paths)
    assert all((version / f["path"]).exists() for f in store.manifest(mid).files)
    assert store.snapshot(mid).rows("images") == 7


def test_a_removed_unit_leaves_in_the_commit_that_adds_its_successor(tmp_path):
    """A re-tiled scene: the new unit and the old unit's removal are one manifest update (one generation);
    the old files are retired, not deleted, while an older snapshot may read them; a removal of a unit
    another writer removed (or replaced) first is a no-op, not an error."""
    from pipelines.store.writer import replacement_token

    store, mid = committed_version(
        str(tmp_path / "store"),
        "remove",
        {"chips/a/shard-000000.tar": (4, 1), "chips/b/shard-000001.tar": (2, 2)},
    )
    model = {"dim": 16, "dtype": "float32"}
    old = store.snapshot(mid)
    gen = store.manifest(mid).generation
    prior = store.manifest(mid).unit_map()["chips/a/shard-000000.tar"]
    old_paths = {f["path"] for f in store.manifest(mid).files if f["unit"] == prior["id"]}

    retile = VersionWriter(store, mid, model)
    late = VersionWriter(store, mid, model)  # a second nightly run that saw the same manifest
    retile.stage({"id": "chips/a/shard-000002.tar", "fingerprint": "a2"}, unit_tables(mid, 4, 9))
    retile.stage_removal(prior["id"], replacement_token(prior))
    late.stage_removal(prior["id"], replacement_token(prior))
    assert retile.commit() == 2 and retile.removed == [prior["id"]]
    manifest = store.manifest(mid)
    assert manifest.generation == gen + 1
    assert sorted(manifest.unit_map()) == ["chips/a/shard-000002.tar", "chips/b/shard-000001.tar"]
    assert {r["path"] for r in manifest.retired} == old_paths
    keys = store.snapshot(mid).read_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(image_columns(9, 4)["key"] + image_columns(2, 2)["key"])
    assert old.rows("images") == 6 and len(old.read_table(columns=["key"])) == 6  # the old files still read
    assert late.commit() == 0 and late.removed == [] and store.manifest(mid).generation == gen + 1
    retile.close()
    late.close()


def test_two_writers_opened_together_both_commit_and_a_duplicate_unit_is_dropped(tmp_path):
    """Writers merge into what others committed meanwhile (the old code kept the manifest it had opened)."""
    store = EmbeddingStore(str(tmp_path / "store"))
    mid = fake_model_id("two-writers")
    model = {"dim": 16, "dtype": "float32"}
    a, b = VersionWriter(store, mid, model), VersionWriter(store, mid, model)  # both see an empty version
    a.stage({"id": "train/shard-0.tar"}, unit_tables(mid, 4, 1))
    b.stage({"id": "test/shard-0.tar"}, unit_tables(mid, 3, 2))
    b.stage({"id": "train/shard-0.tar"}, unit_tables(mid, 4, 1))  # the same unit as `a`: committed once
    assert a.commit() == 1
    assert b.commit() == 1 and b.superseded == ["train/shard-0.tar"]
    a.close()
    b.close()
    manifest = store.manifest(mid)
    assert [u["id"] for u in manifest.units] == ["test/shard-0.tar", "train/shard-0.tar"]
    assert manifest.generation == 2 and store.snapshot(mid).rows("images") == 7
    assert len(manifest.files) == 2 and all(f["sha256"] for f in manifest.files)
    store.snapshot(mid).read_table()  # every listed file matches its checksum


def _run_writers(url: str, tmp_path, splits=("train", "test"), units: int = 4) -> list[list[str]]:
    ready = tmp_path / "ready"
    ready.mkdir()
    cmd = [sys.executable, "-m", "tests.store_data", url]
    procs = [
        subprocess.Popen(
            [*cmd, split, str(units), str(ready), str(len(splits))],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for split in splits
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _check_both_writers_committed(store: EmbeddingStore, written: list[list[str]]) -> None:
    manifest = store.manifest()
    assert sorted(u["id"] for u in manifest.units) == sorted(u for ids in written for u in ids)
    assert manifest.generation == sum(len(ids) for ids in written)  # one generation per commit, none lost
    snapshot = store.snapshot()
    table = snapshot.read_table(columns=["key", "embedding"])  # verifies every file's checksum
    assert table.num_rows == snapshot.rows("images") == 20 * sum(len(ids) for ids in written)
    assert len(set(table.column("key").to_pylist())) == table.num_rows


def test_two_writer_processes_into_one_local_version_commit_every_unit(tmp_path):
    url = str(tmp_path / "store")
    written = _run_writers(url, tmp_path)
    store = EmbeddingStore(url)
    _check_both_writers_committed(store, written)
    version = tmp_path / "store" / store.manifest().model_id
    assert not (version / "_staging").exists()


@pytest.mark.integration
def test_two_writer_processes_into_one_s3_version_commit_every_unit(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/emb"
    written = _run_writers(url, tmp_path)
    store = EmbeddingStore(url)
    _check_both_writers_committed(store, written)
    mid = store.manifest().model_id
    assert not store.fs.exists(f"{s3_bucket}/emb/{mid}/_staging")
    assert not store.fs.exists(f"{s3_bucket}/emb/{mid}/_commit.lock")  # released


@pytest.mark.integration
def test_s3_manifest_write_is_a_compare_and_swap(s3_bucket):
    store, mid, _, _ = write_synthetic_version(f"s3://{s3_bucket}/emb", units=1, rows=3)
    base = store.version_path(mid)
    manifest, token = read_for_update(store.fs, base)
    _, same = read_for_update(store.fs, base)
    assert token == same and manifest.generation == 1
    newer = dict(manifest.to_json(), generation=2)
    write_manifest(store.fs, base, type(manifest).from_json(newer, "test"), token)
    with pytest.raises(ManifestConflict):  # prepared on generation 1, which is gone
        write_manifest(store.fs, base, manifest, token)
    with pytest.raises(ManifestConflict):  # "create" where one exists
        write_manifest(store.fs, base, manifest, None)
    assert store.manifest(mid).generation == 2


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
        store.snapshot()


@pytest.mark.integration
def test_store_on_s3(s3_bucket):
    url = f"s3://{s3_bucket}/emb"
    store, mid, vecs, cols = write_synthetic_version(url, units=2, rows=7, max_rows_per_file=4)
    fresh = EmbeddingStore(url)  # a new reader sees the committed version
    snapshot = fresh.snapshot(mid[:8])
    table = snapshot.read_table()
    assert sorted(table.column("key").to_pylist()) == sorted(cols["key"])
    assert len(snapshot.paths("images")) == 4
    assert not fresh.fs.exists(f"{s3_bucket}/emb/{mid}/_staging")
    assert fake_model_id("m1") == mid


def test_take_reads_rows_across_row_groups_in_the_order_asked(tmp_path):
    store, _, _, cols = write_synthetic_version(
        str(tmp_path / "s"), units=2, rows=9000, dim=4, max_rows_per_file=9000
    )
    snapshot = store.snapshot()
    assert pq.read_metadata(snapshot.paths("images")[0]).num_row_groups == 2  # 8192 rows per group
    keys = [k for _, b in snapshot.iter_batches("images", ["key"]) for k in b.column("key").to_pylist()]
    want = [17999, 0, 8192, 8191, 9000, 12, 8192, 17000]
    got = snapshot.take("images", want, ["key", "lat"])
    assert got.column("key").to_pylist() == [keys[i] for i in want]
    assert snapshot.take("images", [], ["key"]).num_rows == 0
    with pytest.raises(IndexError):
        snapshot.take("images", [18000], ["key"])
