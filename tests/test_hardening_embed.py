"""Issue 19 (2): the embedding job never commits a tar that did not read to its end, and re-embeds a unit whose
source changed since it was committed (never "nothing new")."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from tests.embed_helpers import dataset_captions, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ssjdn.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("hardening-embed")
    data = generate_synthetic(root / "data", n_per_class=8, seed=2, size=32, classes=["beach", "forest"])
    ckpt = make_tiny_checkpoint(root / "tiny.pt", dataset_captions(data))
    return {"root": root, "images": sorted((data / "images").iterdir()), "ckpt": ckpt}


def _tar(path: Path, images: list[Path]) -> bytes:
    with tarfile.open(path, "w") as tar:
        for p in images:
            for ext, data in (("jpg", p.read_bytes()), ("json", json.dumps({"captions": [p.stem]}).encode())):
                info = tarfile.TarInfo(f"{p.stem}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.mark.integration
def test_a_unit_whose_tar_changed_since_its_commit_is_re_embedded_in_place(tiny, tmp_path, ray_local, capsys):
    """Old behaviour: a warning, "nothing new", exit 0, the store keeping rows of a tar that no longer exists.
    Now the changed unit is embedded again and its old rows leave the version in the commit that adds the new
    ones; a reader still on the older snapshot keeps reading the old rows."""
    from pipelines.embed.job import embed_archive
    from pipelines.store.reader import EmbeddingStore
    from ssjdn_cli.main import main

    archive = tmp_path / "tars"
    archive.mkdir()
    _tar(archive / "a.tar", tiny["images"][:3])
    _tar(archive / "b.tar", tiny["images"][3:5])
    store_url = str(tmp_path / "store")
    report = embed_archive(str(archive), store_url, str(tiny["ckpt"]), progress=False)
    assert report.units_embedded == 2 and not report.failed_units
    store = EmbeddingStore(store_url)
    before = store.snapshot()
    old_a = {f["path"] for f in store.manifest().files if f["unit"] == "a.tar"}
    old_b = [f for f in store.manifest().files if f["unit"] == "b.tar"]

    _tar(archive / "a.tar", tiny["images"][5:9])  # rewritten in place: other images, size and mtime
    report = embed_archive(str(archive), store_url, str(tiny["ckpt"]), progress=False)
    assert report.changed_units == ["a.tar"] and report.replaced_units == ["a.tar"], report.summary()
    assert report.units_embedded == 1 and report.images == 4 and not report.failed_units
    manifest = store.manifest()
    assert manifest.generation == before.generation + 1  # old rows out, new rows in: one commit
    keys = store.snapshot().read_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(p.stem for p in tiny["images"][3:9])
    assert [f for f in manifest.files if f["unit"] == "b.tar"] == old_b  # untouched
    assert {r["path"] for r in manifest.retired} == old_a
    old_keys = before.read_table(columns=["key"]).column("key").to_pylist()  # the older generation still reads
    assert sorted(old_keys) == sorted(p.stem for p in tiny["images"][:5])

    assert main(["embed", str(archive), store_url, "--checkpoint", str(tiny["ckpt"]), "--no-progress"]) == 0
    assert "0 unit(s) failed" in capsys.readouterr().out
    assert store.manifest().generation == manifest.generation  # nothing new


def _zeros(n: int, dim: int):
    import numpy as np

    return np.zeros((n, dim), np.float32)


@pytest.mark.integration
def test_a_tar_cut_in_the_middle_is_not_committed_and_is_embedded_once_restored(tiny, tmp_path, ray_local):
    """The probe's case: a folder of tars, one cut in the middle. Old behaviour: exit 0, "0 unit(s) failed",
    half its images committed (bad entries keyed `?`), and after restoring the file "nothing new" for ever."""
    from pipelines.embed.job import embed_archive
    from pipelines.store.reader import EmbeddingStore

    archive = tmp_path / "tars"
    archive.mkdir()
    whole = _tar(archive / "a.tar", tiny["images"][:10])
    _tar(archive / "b.tar", tiny["images"][10:13])
    (archive / "a.tar").write_bytes(whole[: len(whole) // 2])
    store_url = str(tmp_path / "store")

    report = embed_archive(str(archive), store_url, str(tiny["ckpt"]), progress=False)
    assert [f["unit"] for f in report.failed_units] == ["a.tar"], report.summary()
    assert "does not read to its end" in report.failed_units[0]["reason"]
    assert report.units_embedded == 1 and report.images == 3 and not report.bad
    store = EmbeddingStore(store_url)
    assert [u["id"] for u in store.manifest().units] == ["b.tar"]

    (archive / "a.tar").write_bytes(whole)  # restored
    report = embed_archive(str(archive), store_url, str(tiny["ckpt"]), progress=False)
    assert not report.failed_units and report.units_embedded == 1 and report.images == 10
    keys = EmbeddingStore(store_url).snapshot().read_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(p.stem for p in tiny["images"][:13])
    assert os.path.getsize(archive / "a.tar") == len(whole)


def test_image_links_out_of_the_archive_are_refused_unless_followed(tiny, tmp_path):
    """An image folder whose files include a link to a file outside it (and one to a non-image secret): both are
    refused with the reason, never read; a link inside the folder is fine; `--follow-symlinks` reads them."""
    from pipelines.embed.job import embed_archive
    from pipelines.embed.sources import discover

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "elsewhere.jpg").write_bytes(tiny["images"][0].read_bytes())
    (outside / "secret.jpg").write_text("SECRET-TEXT-7f3a")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "real.jpg").write_bytes(tiny["images"][1].read_bytes())
    (folder / "inside.jpg").symlink_to(folder / "real.jpg")
    (folder / "out.jpg").symlink_to(outside / "elsewhere.jpg")
    (folder / "secret.jpg").symlink_to(outside / "secret.jpg")

    _, _, samples = discover(str(folder))
    refused = {s["key"].rsplit("__", 1)[-1]: s["refused"] for s in samples if s.get("refused")}
    assert sorted(refused) == ["out", "secret"], refused
    assert all("symbolic link out of the dataset root" in r and "--follow-symlinks" in r for r in refused.values())
    _, _, followed = discover(str(folder), follow_symlinks=True)
    assert not any(s.get("refused") for s in followed) and len(followed) == 4

    # Only refused images left to do: reported as bad samples, nothing read, nothing committed.
    only_links = tmp_path / "links"
    only_links.mkdir()
    (only_links / "out.jpg").symlink_to(outside / "elsewhere.jpg")
    (only_links / "secret.jpg").symlink_to(outside / "secret.jpg")
    report = embed_archive(str(only_links), str(tmp_path / "store"), str(tiny["ckpt"]), progress=False)
    assert report.units_total == 0 and report.images == 0
    assert sorted(b["key"].rsplit("__", 1)[-1] for b in report.bad) == ["out", "secret"]
    assert "SECRET-TEXT" not in str(report.to_json())
