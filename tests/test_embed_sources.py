"""What the embedding job sees in an archive (no Ray): shard manifests, tar folders, datasets, image folders,
listings; incremental planning per unit and per table; reading a unit with unreadable files; tars that do not
read to their end; units whose source changed since they were committed."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pytest

from pipelines.embed.sources import UnitReadError, change_reason, discover, plan_units, read_unit
from pipelines.shard.layout import member_uri, split_member_uri


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
    prior = {"images": 3, "fingerprint": "old", "committed_at": "t0"}
    todo, complete, changed = plan_units([shard], [], {shard["id"]: prior}, ("images",))
    # changed: planned again whole, as a replacement of the committed entry it saw
    assert complete == 0 and changed == ["test/shard-000000.tar"]
    assert todo == [{**shard, "tables": ["images"], "replaces": {"fingerprint": "old", "committed_at": "t0"}}]
    with_captions = plan_units([shard], [], {shard["id"]: {**prior, "captions": 15}}, ("images",))[0]
    assert with_captions[0]["tables"] == ["images", "captions"]  # every table it had, not only those asked
    assert member_uri("s3://b/s.tar", "k.jpg") == "tar://k.jpg::s3://b/s.tar"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found no shards"):
        discover(str(tmp_path / "empty"))
    stac = tmp_path / "catalog.json"
    stac.write_text(json.dumps({"type": "Catalog", "stac_version": "1.0.0", "id": "c", "links": []}))
    with pytest.raises(ValueError, match=r"catalog\.json is a STAC document: tile its scenes first"):
        discover(str(stac))


def test_units_a_manifest_no_longer_lists_are_gone_and_no_other_archives_units_are(tmp_path):
    from pipelines.embed.sources import Archive, gone_units

    root = "file:///arch/chips"
    archive = Archive("tiles", [], [], root_url=root, listed={"chips/a-1/shard-000002.tar"}, tiled=True)
    entry = {"kind": "shard", "fingerprint": "f", "committed_at": "t"}
    done = {
        "chips/a-1/shard-000000.tar": {**entry, "url": f"{root}/chips/a-1/shard-000000.tar"},  # re-tiled: gone
        "chips/a-1/shard-000002.tar": {**entry, "url": f"{root}/chips/a-1/shard-000002.tar"},  # listed
        "chips/b-2/shard-000001.tar": {**entry, "url": f"{root}/chips/b-2/shard-000001.tar"},  # scene gone
        "train/shard-000000.tar": {**entry, "url": "file:///other/train/shard-000000.tar"},  # another archive
        "files/test/abc": {"kind": "files", "keys": ["k"]},
    }
    gone = gone_units(archive, done)
    assert [(g["id"], g["group"]) for g in gone] == [
        ("chips/a-1/shard-000000.tar", "a-1"),
        ("chips/b-2/shard-000001.tar", "b-2"),
    ]
    assert gone[0]["replaces"] == {"fingerprint": "f", "committed_at": "t"}
    assert gone_units(Archive("tar-folder", [], [], root_url=root), done) == []  # no manifest, no rule


def _tar_of(path, n: int = 10) -> bytes:
    """A bare tar of `n` samples (jpg + json members, the jpg bytes need not be an image here)."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (
                ("jpg", bytes([i]) * 3000),
                ("json", json.dumps({"captions": [f"c{i}"]}).encode()),
            ):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


SAMPLE_BYTES = 512 + 3072 + 512 + 512  # a jpg header + data, a json header + data


@pytest.mark.parametrize(
    "damage",
    ["cut inside a member", "cut at a member boundary", "corrupt header", "second archive", "empty file"],
)
def test_a_tar_that_does_not_read_to_its_end_fails_the_unit(tmp_path, damage):
    """Issue 19 (2): the old reader yielded the first samples and `?` rows (or nothing at all) and the unit
    counted as complete; now reading the unit raises, so the job fails it and a re-run retries it."""
    folder = tmp_path / "tars"
    folder.mkdir()
    whole = _tar_of(folder / "a.tar")
    (unit,) = discover(str(folder))[1]
    assert [r["key"] for r in read_unit(unit)] == [f"k{i}" for i in range(10)]  # intact: all ten
    cut = {
        "cut inside a member": whole[: 5 * SAMPLE_BYTES + 700],
        "cut at a member boundary": whole[: 5 * SAMPLE_BYTES],
        "corrupt header": whole[: 5 * SAMPLE_BYTES] + b"\x01" * 100 + whole[5 * SAMPLE_BYTES + 100 :],
        "second archive": whole[: 10 * SAMPLE_BYTES + 1024] + whole,
        "empty file": b"",
    }[damage]
    (folder / "a.tar").write_bytes(cut)
    rows = []
    with pytest.raises(UnitReadError, match=r"a\.tar: the tar does not read to its end"):
        rows.extend(read_unit(unit))
    assert all(r["error"] is None for r in rows)  # what came before the damage, never a `?` row


def test_a_shard_whose_size_is_not_the_manifests_fails_the_unit(dataset, tmp_path):
    from pipelines.shard.job import shard_dataset

    shard_dataset(dataset, str(tmp_path / "shards"), maxcount=3, progress=False)
    unit = discover(str(tmp_path / "shards"))[1][0]
    assert unit["bytes"] == os.path.getsize(unit["url"]) and len(list(read_unit(unit))) == unit["expected"]
    data = open(unit["url"], "rb").read()
    with open(unit["url"], "ab") as f:  # zeros appended: still a valid tar, but not the committed shard
        f.write(bytes(10240))
    with pytest.raises(UnitReadError, match=r"bytes, but the shard manifest lists"):
        list(read_unit(unit))
    # same size, one byte of an image changed: a valid tar that reads to its end, but not the shard's sha256
    i = data.index(b"\xff\xd9")  # a JPEG's end-of-image marker
    with open(unit["url"], "wb") as f:
        f.write(data[: i - 1] + bytes([data[i - 1] ^ 1]) + data[i:])
    with pytest.raises(UnitReadError, match=r"is not the .* the shard manifest lists"):
        list(read_unit(unit))


def test_bare_tars_carry_a_source_signature_and_a_rewritten_tar_is_changed(tmp_path):
    """Issue 19 (2): bare tars had no fingerprint, so a tar rewritten after its unit was committed was never
    noticed; now size + mtime (ETag on object stores) is recorded and compared."""
    folder = tmp_path / "tars"
    folder.mkdir()
    _tar_of(folder / "a.tar", 3)
    _tar_of(folder / "b.tar", 2)
    kind, units, _ = discover(str(folder))
    assert kind == "tar-folder" and all(u["fingerprint"].startswith("size=") for u in units)
    done = {
        u["id"]: {"id": u["id"], "kind": "shard", "images": 3, "fingerprint": u["fingerprint"]} for u in units
    }
    assert plan_units(units, [], done, ("images",)) == ([], 2, [])
    _tar_of(folder / "a.tar", 4)  # restored or fixed in place: other size, other mtime
    os.utime(folder / "b.tar", ns=(1, 1))  # same bytes, touched: other mtime
    units = discover(str(folder))[1]
    todo, complete, changed = plan_units(units, [], done, ("images",))
    assert [u["id"] for u in todo] == changed == ["a.tar", "b.tar"] and complete == 0
    assert "source changed since it was embedded" in change_reason(units[0], done["a.tar"])
    # a listing of tars gets the same signatures (one folder listing, not one request per tar)
    (tmp_path / "list.txt").write_text(f"{folder / 'a.tar'}\n{folder / 'b.tar'}\n")
    listed = discover(str(tmp_path / "list.txt"))[1]
    assert [u["fingerprint"] for u in listed] == [u["fingerprint"] for u in units]


def test_units_committed_from_a_broken_tar_by_an_older_version_are_flagged():
    unit = {"id": "a.tar", "kind": "shard", "url": "a.tar", "fingerprint": None}
    prior = {"id": "a.tar", "images": 5, "bad": [{"key": "?", "reason": "ReadError: unexpected end of data"}]}
    todo, complete, changed = plan_units([unit], [], {"a.tar": prior}, ("images",))
    assert [u["id"] for u in todo] == changed == ["a.tar"] and complete == 0
    assert "did not read to its end" in change_reason(unit, prior)
    assert change_reason(unit, {**prior, "bad": [{"key": "k1", "reason": "not an image"}]}) is None
