"""Runs the SQL of docs/store.md, block by block and unchanged but for the version path, with DuckDB."""

from __future__ import annotations

import re
from collections import Counter

import duckdb
import numpy as np
import pytest

from pipelines.search.exact import exact_search
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter
from tests.conftest import REPO
from tests.store_data import fake_model_id, unit_vectors

DOC = REPO / "docs" / "store.md"
DIM = 256
CLASSES = ["agricultural", "airplane", "beach", "forest", "golfcourse", "harbor", "runway"]
GROUPS = {
    "airplane": "transport",
    "runway": "transport",
    "harbor": "transport",
    "forest": "vegetation",
    "agricultural": "vegetation",
    "golfcourse": "vegetation",
}


def doc_statements() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6, "docs/store.md lost its SQL examples"
    return [s.strip() for block in blocks for s in block.split(";") if s.strip()]


def write_ucm_like_store(url: str, storage_options=None) -> tuple[EmbeddingStore, str]:
    store = EmbeddingStore(url, storage_options)
    mid = fake_model_id("duckdb-docs")
    writer = VersionWriter(store, mid, {"dim": DIM, "dtype": "float32", "config": "cpu-small"})
    for unit, numbers in enumerate((range(1, 31), range(31, 61))):
        n = len(numbers)
        keys = [f"ucm__{i}" for i in numbers]
        meta = {
            "key": keys,
            "source": [f"tar://{k}.jpg::{url}/shards/train/shard-{unit:06d}.tar" for k in keys],
            "split": ["test" if i % 4 == 0 else "train" for i in numbers],
            "class": [CLASSES[i % len(CLASSES)] for i in numbers],
            "lat": [None] * n,
            "lon": [None] * n,
        }
        images = build_table("images", meta, unit_vectors(n, DIM, seed=unit), dim=DIM, model_id=mid)
        caps = {c: [v for v in meta[c] for _ in range(2)] for c in meta}
        caps.update(
            image_key=caps["key"],
            key=[f"{k}__cap{j}" for k in keys for j in range(2)],
            caption_index=[j for _ in keys for j in range(2)],
            caption=[f"caption {j} of {k}" for k in keys for j in range(2)],
        )
        captions = build_table(
            "captions", caps, unit_vectors(2 * n, DIM, seed=10 + unit), dim=DIM, model_id=mid
        )
        writer.stage(
            {"id": f"train/shard-{unit:06d}.tar", "kind": "shard", "bad": []},
            {"images": images, "captions": captions},
        )
    writer.commit()
    return store, mid


def run_doc_sql(con: duckdb.DuckDBPyConnection, version: str) -> list[list[tuple]]:
    """Every statement of the doc in order; returns the rows of its SELECT statements."""
    results = []
    for stmt in doc_statements():
        if stmt.startswith("SET VARIABLE version ="):
            stmt = f"SET VARIABLE version = '{version}'"
        rows = con.execute(stmt).fetchall()
        if stmt.startswith("SELECT"):
            results.append(rows)
    return results


def check_results(results: list[list[tuple]], store: EmbeddingStore, mid: str) -> None:
    snapshot = store.snapshot(mid)
    images = snapshot.read_table().to_pylist()
    per_class, nn_list, nn_array, text_to_image, own_caption, groups = results  # the doc's SELECTs, in order
    counts = Counter(r["class"] for r in images)
    tests = Counter(r["class"] for r in images if r["split"] == "test")
    assert per_class == sorted(((c, n, tests[c]) for c, n in counts.items()), key=lambda t: (-t[1], t[0]))
    q = next(np.asarray(r["embedding"], np.float32) for r in images if r["key"] == "ucm__1")
    expected = [h.key for h in exact_search(snapshot, q, k=10)[0]]
    assert [r[0] for r in nn_list] == expected and nn_list[0][2] == pytest.approx(1.0, abs=1e-6)
    expected_test = [h.key for h in exact_search(snapshot, q, k=10, where="split = 'test'")[0]]
    assert [r[0] for r in nn_array] == expected_test
    cap = snapshot.read_table("captions").to_pylist()
    c0 = next(np.asarray(r["embedding"], np.float32) for r in cap if r["key"] == "ucm__1__cap0")
    assert [r[0] for r in text_to_image] == [h.key for h in exact_search(snapshot, c0, k=10)[0]]
    assert sum(r[1] for r in own_caption) == 2 * len(images) and len(own_caption) == len(CLASSES)
    want_groups = Counter(GROUPS[r["class"]] for r in images if r["class"] in GROUPS)
    assert [(g, n) for g, n, _ in groups] == sorted(want_groups.items())


def test_doc_sql_on_a_local_store(tmp_path):
    store, mid = write_ucm_like_store(str(tmp_path / "store"))
    # a file a killed run left behind: the doc's recipe must not read it
    stray = tmp_path / "store" / mid / "images" / "part-killed-run-0000.parquet"
    stray.write_bytes((next((tmp_path / "store" / mid / "images").glob("*.parquet"))).read_bytes())
    results = run_doc_sql(duckdb.connect(), f"{tmp_path}/store/{mid}/")
    check_results(results, store, mid)


@pytest.mark.integration
def test_doc_sql_on_s3_through_fsspec(s3_bucket):
    import s3fs

    store, mid = write_ucm_like_store(f"s3://{s3_bucket}/store")
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem())
    check_results(run_doc_sql(con, f"s3://{s3_bucket}/store/{mid}/"), store, mid)
