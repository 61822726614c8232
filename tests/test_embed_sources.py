"""What the embedding job sees in an archive (no Ray): shard manifests, tar folders, datasets, image folders,
listings; incremental planning per unit and per table; reading a unit with unreadable files."""

from __future__ import annotations

import shutil

import pytest

from pipelines.embed.sources import discover, member_uri, plan_units, read_unit, split_member_uri


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from ssjdn.data.synthetic import generate_synthetic

    return generate_synthetic(
        tmp_path_factory.mktemp("src") / "data", n_per_class=3, seed=4, size=32, classes=["beach", "forest"]
    )


def test_shard_manifest_units_and_split_filter(dataset, tmp_path):
    from pipelines.shard.job import shard_dataset

    shard_dataset(dataset, str(tmp_path / "shards"), maxcount=2, progress=False)
    kind, units, samples = discover(str(tmp_path / "shards"))
    assert kind == "webdataset" and not samples
    assert all(u["fingerprint"] and u["expected"] and u["url"].endswith(u["id"]) for u in units)
    kind, test_units, _ = discover(str(tmp_path / "shards"), splits=["test"])
    assert test_units and {u["split"] for u in test_units} == {"test"}
    rows = list(read_unit(test_units[0]))
    assert len(rows) == test_units[0]["expected"] and all(r["error"] is None and r["image"] for r in rows)
    assert split_member_uri(rows[0]["source"]) == (test_units[0]["url"], f"{rows[0]['key']}.jpg")
    # a bare folder of tars (no manifest) is an archive too
    (tmp_path / "shards" / "_manifest.json").unlink()
    kind, bare, _ = discover(str(tmp_path / "shards"))
    assert kind == "tar-folder" and sorted(u["id"] for u in bare) == sorted(u["id"] for u in units)


def test_dataset_and_image_folder_units_are_incremental_by_key(dataset, tmp_path):
    kind, units, samples = discover(str(dataset))
    assert kind == "dataset" and not units and len(samples) == 6
    assert all(s["captions"] and s["class"] in ("beach", "forest") for s in samples)
    todo, complete, _ = plan_units([], samples, {}, ("images",), chunk_size=4)
    assert [len(u["samples"]) for u in todo] == [4, 2] and complete == 0
    done = {todo[0]["id"]: {"images": 4, "keys": [s["key"] for s in todo[0]["samples"]]}}
    todo2, _, _ = plan_units([], samples, done, ("images",), chunk_size=4)
    assert [s["key"] for u in todo2 for s in u["samples"]] == [s["key"] for s in todo[1]["samples"]]
    # asking for captions as well: every image lacks them, only those two lack the image
    todo3, _, _ = plan_units([], samples, done, ("images", "captions"), chunk_size=10)
    assert sorted((tuple(u["tables"]), len(u["samples"])) for u in todo3) == [
        (("captions",), 4),
        (("images", "captions"), 2),
    ]

    folder = tmp_path / "folder"
    shutil.copytree(dataset / "images", folder / "a")
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    kind, _, files = discover(str(folder))
    assert kind == "image-folder" and len(files) == 7 and all(s["split"] is None for s in files)
    (folder / "a" / "gone.jpg").write_bytes(b"x")
    todo4, _, _ = plan_units([], discover(str(folder))[2], {}, ("images",))
    (folder / "a" / "gone.jpg").unlink()  # disappears between listing and reading
    rows = {r["key"]: r for r in read_unit(todo4[0])}
    assert rows["folder__a_gone"]["error"] and "gone.jpg" in rows["folder__a_gone"]["error"]
    assert rows["folder__a_broken"]["error"] is None  # bytes are read; decoding (and refusing) happens later


def test_listing_and_changed_shards(tmp_path, dataset):
    listing = tmp_path / "list.txt"
    paths = sorted(str(p) for p in (dataset / "images").iterdir())
    listing.write_text("# images to embed\n" + "\n".join(paths) + "\n")
    kind, units, samples = discover(str(listing))
    assert kind == "listing" and [s["source"] for s in samples] == paths
    shard = {"id": "test/shard-000000.tar", "kind": "shard", "url": "x", "fingerprint": "new"}
    _, complete, changed = plan_units(
        [shard], [], {shard["id"]: {"images": 3, "fingerprint": "old"}}, ("images",)
    )
    assert complete == 1 and changed == ["test/shard-000000.tar"]
    assert member_uri("s3://b/s.tar", "k.jpg") == "tar://k.jpg::s3://b/s.tar"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found no shards"):
        discover(str(tmp_path / "empty"))
