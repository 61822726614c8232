"""The Ray Data embedding job on real shards (moto S3 and local): exactness, incremental runs, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.embed.job import embed_archive
from pipelines.encoders import CheckpointError
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import embeddings_to_numpy
from tests.embed_helpers import dataset_captions, direct_embeddings, make_tiny_checkpoint
from tests.store_data import is_embedding_type

CLASSES = ["airport", "beach", "farmland", "forest"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ssjdn.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("embed")
    data = generate_synthetic(root / "data", n_per_class=5, seed=1, size=32, classes=CLASSES)
    ckpt = make_tiny_checkpoint(root / "tiny.pt", dataset_captions(data))
    doc = json.loads((data / "dataset.json").read_text())
    images = {im["filename"].rsplit(".", 1)[0]: data / "images" / im["filename"] for im in doc["images"]}
    captions = {im["filename"].rsplit(".", 1)[0]: [s["raw"] for s in im["sentences"]] for im in doc["images"]}
    return {"root": root, "data": data, "ckpt": ckpt, "images": images, "captions": captions}


def _by_key(table: pa.Table) -> dict[str, np.ndarray]:
    return dict(zip(table.column("key").to_pylist(), embeddings_to_numpy(table.column("embedding"))))


def _listing(store: EmbeddingStore) -> dict[str, int]:
    return {p: store.fs.info(p)["size"] for p in store.fs.find(store.root)}


@pytest.fixture(scope="module")
def s3_archive(tiny, s3_server):
    """The synthetic dataset as shards on moto S3, one sample per shard (20 units: a run takes a while)."""
    import uuid

    import boto3

    from pipelines.shard.job import shard_dataset

    bucket = f"embed-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"]).create_bucket(Bucket=bucket)
    shard_dataset(tiny["data"], f"s3://{bucket}/shards", maxcount=1, progress=False)
    return {"bucket": bucket, "shards": f"s3://{bucket}/shards"}


@pytest.fixture(scope="module")
def clean_store(tiny, s3_archive, ray_local):
    """One uninterrupted run (images + captions) into an S3 store: the reference for the other tests."""
    url = f"s3://{s3_archive['bucket']}/clean-store"
    report = embed_archive(
        s3_archive["shards"], url, str(tiny["ckpt"]), captions=True, batch_size=8, progress=False
    )
    return {"url": url, "report": report}


@pytest.mark.integration
def test_embeddings_equal_model_output_and_rerun_writes_nothing(tiny, s3_archive, clean_store):
    report = clean_store["report"]
    assert (
        report.units_embedded == report.units_total == 20 and report.images == 20 and report.captions == 100
    )
    assert not report.bad and not report.failed_units
    store = EmbeddingStore(clean_store["url"])
    manifest = store.manifest()
    assert manifest.model_id == hashlib.sha256(tiny["ckpt"].read_bytes()).hexdigest()
    images = store.snapshot_of(manifest).read_table("images")
    caps = store.snapshot_of(manifest).read_table("captions")
    assert is_embedding_type(images.schema.field("embedding").type, 32, pa.float32())
    assert images.num_rows == 20 and caps.num_rows == 100

    # Parquet embeddings equal the model's own output (same image files, no Ray) within 1e-5
    keys = sorted(tiny["images"])
    all_caps = [(k, j, c) for k in keys for j, c in enumerate(tiny["captions"][k])]
    img_direct, txt_direct = direct_embeddings(
        tiny["ckpt"], [tiny["images"][k] for k in keys], [c for _, _, c in all_caps]
    )
    stored = _by_key(images)
    assert sorted(stored) == [f"synthetic__{k}" for k in keys]
    for k, direct in zip(keys, img_direct):
        np.testing.assert_allclose(stored[f"synthetic__{k}"], direct, atol=1e-5, rtol=0)
    text_of = {(r["image_key"], r["caption_index"]): r["caption"] for r in caps.to_pylist()}
    cap_emb = _by_key(caps)
    for (k, j, c), direct in zip(all_caps, txt_direct):
        assert text_of[(f"synthetic__{k}", j)] == c
        np.testing.assert_allclose(cap_emb[f"synthetic__{k}__cap{j}"], direct, atol=1e-5, rtol=0)
    norms = np.linalg.norm(embeddings_to_numpy(images.column("embedding")), axis=1)
    np.testing.assert_allclose(norms, 1, atol=1e-5)
    row = images.filter(pa.compute.equal(images.column("key"), "synthetic__airport_0000")).to_pylist()[0]
    assert row["class"] == "airport" and row["split"] in ("train", "val", "test") and row["lat"] is None
    # the source URI resolves to the exact image bytes inside the S3 shard
    from pipelines.search.page import fetch_images

    fetched = fetch_images([row["source"]])[row["source"]]
    assert fetched["image"] == tiny["images"]["airport_0000"].read_bytes() and len(fetched["captions"]) == 5

    # nothing new: nothing is written, not even the manifest
    before = _listing(store)
    again = embed_archive(
        s3_archive["shards"], clean_store["url"], str(tiny["ckpt"]), captions=True, progress=False
    )
    assert again.units_embedded == 0 and again.units_done_before == 20
    assert _listing(EmbeddingStore(clean_store["url"])) == before


@pytest.mark.integration
def test_query_cli_image_caption_filter_and_html(tiny, clean_store, capsys):
    from ssjdn_cli.main import main
    from tests.browser import count_loaded_images

    html = tiny["root"] / "hits.html"
    argv = ["query", "--image", str(tiny["images"]["beach_0003"]), "--store", clean_store["url"], "-k", "5"]
    assert main([*argv, "--json", "--html", str(html)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"][0]["key"] == "synthetic__beach_0003"
    assert result["hits"][0]["score"] == pytest.approx(1, abs=1e-5) and len(result["hits"]) == 5
    page = html.read_text()
    assert page.count("data:image/jpeg;base64,") == 5 and "beach_0003" in page
    assert tiny["captions"]["beach_0003"][0].replace("'", "&#x27;") in page
    assert count_loaded_images(html) == (5, 5)  # self-contained: every thumbnail renders in a browser
    # caption -> caption search with a filter
    caption = tiny["captions"]["forest_0001"][2]
    argv = [
        "query",
        caption,
        "--store",
        clean_store["url"],
        "--table",
        "captions",
        "--where",
        "class = 'forest'",
    ]
    assert main([*argv, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["caption"] == caption and {h["class"] for h in hits} == {"forest"}


@pytest.mark.integration
def test_killed_run_leaves_nothing_partial_and_rerun_equals_clean_run(
    tiny, s3_archive, clean_store, ray_local, tmp_path
):
    """A real `ssjdn embed` process is SIGKILLed after its first commit; readers see only whole units;
    the re-run (which also adds the caption table) ends with exactly the clean run's store."""
    import os
    import signal
    import subprocess
    import sys
    import time

    store_url = str(tmp_path / "store")
    mid = hashlib.sha256(tiny["ckpt"].read_bytes()).hexdigest()
    manifest_path = tmp_path / "store" / mid / "_manifest.json"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [
        sys.executable,
        "-m",
        "ssjdn_cli.main",
        "embed",
        s3_archive["shards"],
        store_url,
        "--checkpoint",
        str(tiny["ckpt"]),
        "--batch-size",
        "1",
        "--commit-every",
        "0",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    committed_at_kill = None
    deadline = time.monotonic() + 300  # the first commit waits for actor start-up: slow on a loaded box
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest_path.exists():
                os.killpg(proc.pid, signal.SIGKILL)
                committed_at_kill = len(json.loads(manifest_path.read_text())["units"])
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert committed_at_kill is not None, (
        f"embed exited before its first commit: {proc.stderr.read()[-2000:]}"
    )
    assert 0 < committed_at_kill < 20, f"not killed mid-run ({committed_at_kill} units committed)"

    # readers: only whole, committed units; every listed file complete
    store = EmbeddingStore(store_url)
    manifest = store.manifest()
    committed = store.snapshot_of(manifest).read_table()
    assert committed.num_rows == manifest.rows("images") == sum(u["images"] for u in manifest.units)
    listed = {f["path"] for f in manifest.files}
    on_disk = {
        str(p.relative_to(tmp_path / "store" / mid)) for p in (tmp_path / "store" / mid / "images").glob("*")
    }
    assert listed <= on_disk

    rerun = embed_archive(s3_archive["shards"], store_url, str(tiny["ckpt"]), captions=True, progress=False)
    assert rerun.units_done_before == 0 and rerun.units_embedded == 20  # captions were missing everywhere
    assert rerun.images == 20 - manifest.rows("images") and rerun.captions == 100
    assert not (tmp_path / "store" / mid / "_staging").exists()

    final, clean = EmbeddingStore(store_url), EmbeddingStore(clean_store["url"])
    fm, cm = final.manifest(), clean.manifest()
    assert sorted(f["path"] for f in fm.files) == sorted(f["path"] for f in cm.files)
    assert [u["id"] for u in fm.units] == [u["id"] for u in cm.units]
    for table in ("images", "captions"):
        a = final.snapshot_of(fm).read_table(table).sort_by("key")
        b = clean.snapshot_of(cm).read_table(table).sort_by("key")
        meta = [c for c in a.column_names if c not in ("embedding", "created_at")]
        assert a.select(meta).equals(b.select(meta))
        np.testing.assert_allclose(
            embeddings_to_numpy(a["embedding"]), embeddings_to_numpy(b["embedding"]), atol=1e-6
        )


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.integration
def test_bad_samples_are_skipped_and_reported(tiny, tmp_path, ray_local):
    """A folder of tars (no manifest) with a garbage image, a truncated one, a sample without json and a
    pickle member: good samples are embedded, bad ones reported by key and reason, the pickle never loaded."""
    archive = tmp_path / "tars"
    archive.mkdir()
    good = sorted(tiny["images"])[:4]
    with tarfile.open(archive / "a.tar", "w") as tar:
        for k in good[:2]:
            _tar_member(tar, f"{k}.jpg", tiny["images"][k].read_bytes())
            _tar_member(
                tar, f"{k}.json", json.dumps({"captions": tiny["captions"][k], "class_name": "x"}).encode()
            )
        _tar_member(tar, "garbage.jpg", b"this is not a jpeg")
        _tar_member(tar, "garbage.json", b"{}")
        data = tiny["images"][good[2]].read_bytes()
        _tar_member(tar, "truncated.jpg", data[: len(data) // 3])
        _tar_member(tar, "truncated.json", b"{}")
    with tarfile.open(archive / "b.tar", "w") as tar:
        _tar_member(tar, f"{good[3]}.jpg", tiny["images"][good[3]].read_bytes())
        _tar_member(tar, f"{good[3]}.json", b"{}")
        _tar_member(tar, f"{good[3]}.pyd", b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")  # never unpickled
        _tar_member(tar, "nojson.jpg", tiny["images"][good[0]].read_bytes())
    store_url = str(tmp_path / "store")
    report = embed_archive(str(archive), store_url, str(tiny["ckpt"]), dtype="float16", progress=False)
    assert report.archive_kind == "tar-folder" and report.units_embedded == 2 and not report.failed_units
    assert report.images == 3
    bad = {b["key"]: b["reason"] for b in report.bad}
    assert set(bad) == {"garbage", "truncated", "nojson"}
    assert "garbage.jpg" in bad["garbage"] and "nojson" in bad["nojson"] and "json" in bad["nojson"]
    store = EmbeddingStore(store_url)
    manifest = store.manifest()
    table = store.snapshot_of(manifest).read_table()
    kept = sorted([good[0], good[1], good[3]])
    assert sorted(table.column("key").to_pylist()) == kept
    assert is_embedding_type(table.schema.field("embedding").type, 32, pa.float16())
    assert {b["key"] for u in manifest.units for b in u["bad"]} == set(bad)
    direct, _ = direct_embeddings(tiny["ckpt"], [tiny["images"][k] for k in kept], [])
    np.testing.assert_allclose(
        embeddings_to_numpy(table.sort_by("key").column("embedding")), direct, atol=2e-3
    )
    assert not Path("/tmp/pwned").exists()


def test_checkpoint_whose_config_does_not_match_is_refused(tiny, tmp_path, capsys):
    import torch

    from ssjdn_cli.main import main

    ckpt = torch.load(tiny["ckpt"], weights_only=True)
    ckpt["config"]["model"]["embed_dim"] = 48  # config edited after training: weights are 32-d
    bad = tmp_path / "edited.pt"
    torch.save(ckpt, bad)
    with pytest.raises(
        CheckpointError, match=r"edited.pt: its config .*embed_dim=48.* does not match its weights"
    ):
        embed_archive(str(tiny["data"]), str(tmp_path / "store"), str(bad), progress=False)
    assert not (tmp_path / "store").exists()  # refused before anything was written
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["embed", str(tiny["data"]), str(tmp_path / "store"), "--checkpoint", str(junk)]) == 1
    with pytest.raises(CheckpointError, match="does not exist"):
        embed_archive(str(tiny["data"]), str(tmp_path / "store"), str(tmp_path / "missing.pt"))


def test_query_errors_are_clear(tiny, tmp_path, capsys):
    from ssjdn_cli.main import main

    assert main(["query", "planes", "--store", str(tmp_path / "empty")]) == 1
    assert "is empty: no committed version" in capsys.readouterr().err
    from tests.store_data import write_synthetic_version

    write_synthetic_version(str(tmp_path / "s"), units=1, rows=3)
    assert main(["query", "planes", "--store", str(tmp_path / "s"), "--model-id", "beef"]) == 1
    assert "model_id 'beef' is not in store" in capsys.readouterr().err
    assert (
        main(["query", "planes", "--store", str(tmp_path / "s"), "--where", "class = 'a'; DROP TABLE x"]) == 1
    )
    assert "unexpected character ';'" in capsys.readouterr().err
    assert main(["query", "--store", str(tmp_path / "s")]) == 1  # neither text nor --image
    assert "--image" in capsys.readouterr().err
