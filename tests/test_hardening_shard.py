"""Issue 19 (5, 6 and the bad-sample summary): images from outside the dataset root are refused unless allowed,
whatever form names them (`local:`/`file:` URLs, absolute paths, `..`, symbolic links); no byte of a file that
is not an image reaches a report; bad samples are summarised by reason, with their keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.shard.job import shard_dataset
from pipelines.shard.options import ShardOptions, ShardOptionsError
from pipelines.shard.plan import TooManyBadSamplesError
from pipelines.shard.read import open_shards, read_manifest
from ssjdn.data.errors import DatasetFormatError
from ssjdn.data.readers import load_dataset
from ssjdn.data.synthetic import generate_synthetic
from ssjdn_cli.main import main as cli_main

SECRET = b"root:x:0:0:root:/root:/bin/bash\nAWS_SECRET_ACCESS_KEY=do-not-leak-me\n"


@pytest.fixture
def world(tmp_path) -> dict[str, Path]:
    """A synthetic dataset, a folder of images outside it, and a secret (non-image) file outside it."""
    data = generate_synthetic(tmp_path / "syn", n_per_class=2, size=32, seed=5, classes=["beach", "forest"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    images = sorted((data / "images").glob("*.jpg"))
    (outside / "outside.jpg").write_bytes(images[0].read_bytes())
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return {"data": data, "outside": outside, "images": images, "secret": tmp_path / "secret.txt"}


def _samples(dest: Path) -> dict[str, dict]:
    m = read_manifest(str(dest))
    return {s["key"]: s for s in open_shards([str(dest / e["path"]) for e in m["shards"]])}


def _report(dest: Path) -> list[dict]:
    return [json.loads(line) for line in (dest / "_quarantine" / "report.jsonl").read_text().splitlines()]


def _table(folder: Path, images: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{name},a caption for image {i}\n" for i, name in enumerate(images))
    (folder / "table.csv").write_text("image,caption\n" + rows)
    return folder


@pytest.mark.parametrize(
    "form",
    ["local:///{abs}", "file:///{abs}", "FILE:///{abs}", "/{abs}", "../elsewhere/outside.jpg"],
)
def test_local_names_and_urls_outside_the_root_are_refused_unless_allowed(world, tmp_path, form):
    """Old behaviour: `local:///abs/outside.jpg` in a table was sharded byte for byte (only `file:` was refused)."""
    target = world["outside"] / "outside.jpg"
    name = form.format(abs=str(target).lstrip("/"))
    table = _table(tmp_path / "table", ["inside.jpg", name])
    (table / "inside.jpg").write_bytes(world["images"][1].read_bytes())
    with pytest.raises(DatasetFormatError, match=r"table\.csv: line 3: .*(outside the dataset|escapes)"):
        shard_dataset(table, str(tmp_path / "refused"), progress=False)
    assert not (tmp_path / "refused").exists()  # refused while planning: nothing written
    code = cli_main(["shard", str(table), str(tmp_path / "cli"), "--no-progress"])
    assert code == 1

    # --allow-root: read from there, byte for byte
    result = shard_dataset(
        table, str(tmp_path / "allowed"), allow_root=(str(world["outside"]),), progress=False
    )
    assert result.manifest["totals"]["samples"] == 2
    got = {s["meta"]["source"]: s["image"] for s in _samples(tmp_path / "allowed").values()}
    assert got[str(target)] == target.read_bytes()


def test_remote_urls_in_a_table_stay_allowed_and_names_inside_the_root_are_fine(world, tmp_path):
    table = _table(tmp_path / "t", ["s3://bucket/a.jpg", "gs://bucket/b.jpg", "https://example.org/c.jpg"])
    assert [s.source for s in load_dataset(table).samples] == [
        "s3://bucket/a.jpg",
        "gs://bucket/b.jpg",
        "https://example.org/c.jpg",
    ]
    # absolute paths, `file:` URLs and `..` names that stay inside the dataset are the relative name
    inside = tmp_path / "t2"
    (inside / "images").mkdir(parents=True)
    _table(inside, [f"{inside}/images/a.jpg", f"file://{inside}/images/b.jpg", "sub/../c.jpg"])
    ds = load_dataset(inside)
    assert [(s.filename, s.source) for s in ds.samples] == [
        (n, str(inside / "images" / n)) for n in ("a.jpg", "b.jpg", "c.jpg")
    ]


def test_symlinks_out_of_the_root_are_quarantined_and_the_secret_never_reaches_the_report(world, tmp_path):
    """Old behaviour: both links were followed; the one to the secret put its first bytes, in hex, into the
    quarantine report (`not a recognised image (N bytes, starting 72 6f 6f 74 ...)`)."""
    data, images = world["data"], world["images"]
    out_link, secret_link, in_link = images[0], images[1], images[2]
    out_link.unlink()
    out_link.symlink_to(world["outside"] / "outside.jpg")
    secret_link.unlink()
    secret_link.symlink_to(world["secret"])
    in_link.unlink()
    in_link.symlink_to(images[3])  # a link inside the dataset is fine
    total = len(images)

    dest = tmp_path / "default"
    result = shard_dataset(data, str(dest), max_bad_fraction=1.0, progress=False)
    report = {r["filename"]: r for r in _report(dest)}
    assert set(report) == {out_link.name, secret_link.name}
    for r in report.values():
        assert r["stage"] == "plan" and "symbolic link out of the dataset root" in r["reason"]
        assert "--follow-symlinks" in r["reason"]
    assert result.manifest["totals"]["samples"] == total - 2
    assert result.manifest["bad"]["by_reason"] == {"symbolic link out of the dataset root": 2}
    _no_secret_in(dest)

    # --follow-symlinks: the image behind the link is sharded; the secret is refused as a non-image, unquoted
    dest = tmp_path / "follow"
    result = shard_dataset(data, str(dest), max_bad_fraction=1.0, follow_symlinks=True, progress=False)
    (bad,) = _report(dest)
    assert bad["filename"] == secret_link.name and "not a recognised image" in bad["reason"]
    assert f"{len(SECRET)} bytes, looks like text" in bad["reason"]
    assert result.manifest["totals"]["samples"] == total - 1
    _no_secret_in(dest)

    # --allow-root DIR: links into DIR are fine, others still refused
    dest = tmp_path / "allow"
    shard_dataset(data, str(dest), max_bad_fraction=1.0, allow_root=(str(world["outside"]),), progress=False)
    assert [r["filename"] for r in _report(dest)] == [secret_link.name]


def _no_secret_in(dest: Path) -> None:
    for p in dest.rglob("*"):
        if p.is_file():
            body = p.read_bytes()
            assert b"do-not-leak" not in body and SECRET[:8].hex().encode() not in body, p
            assert SECRET[:8].hex(" ").encode() not in body, p


def test_a_linked_image_folder_is_fine_but_a_linked_subfolder_out_of_it_is_not(world, tmp_path):
    data, images = world["data"], world["images"]
    # the whole image folder is a link (common: data on another disk): its real path is the root
    real = tmp_path / "disk" / "images"
    real.parent.mkdir()
    (data / "images").rename(real)
    (data / "images").symlink_to(real)
    assert shard_dataset(data, str(tmp_path / "a"), progress=False).manifest["bad"]["count"] == 0
    # a subfolder that leads out of it: every image in it is refused
    doc = json.loads((data / "dataset.json").read_text())
    doc["images"][0]["filename"] = "sub/outside.jpg"
    (data / "dataset.json").write_text(json.dumps(doc))
    (real / "sub").symlink_to(world["outside"])
    result = shard_dataset(data, str(tmp_path / "b"), max_bad_fraction=1.0, progress=False)
    (bad,) = _report(tmp_path / "b")
    assert bad["filename"] == "sub/outside.jpg" and "symbolic link out of the dataset root" in bad["reason"]
    assert result.manifest["totals"]["samples"] == len(images) - 1


def test_describe_reports_refused_images_without_reading_them(world, capsys):
    images = world["images"]
    images[1].unlink()
    images[1].symlink_to(world["secret"])
    assert cli_main(["data", "describe", str(world["data"]), "--json"]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["refused_images"]["count"] == 1 and report["unreadable_images"]["count"] == 0
    assert report["refused_images"]["first"][0]["file"] == images[1].name
    assert "symbolic link out of the dataset root" in err and "do-not-leak" not in out + err
    # followed on purpose: read, and unreadable (a text file), still without its content
    assert cli_main(["data", "describe", str(world["data"]), "--json", "--follow-symlinks"]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["refused_images"]["count"] == 0 and report["unreadable_images"]["count"] == 1
    assert "looks like text" in out and "do-not-leak" not in out + err and "72 6f 6f 74" not in out + err
    assert (
        cli_main(["data", "describe", str(world["data"]), "--allow-root", str(world["secret"].parent)]) == 1
    )
    assert "refused" not in capsys.readouterr().err


def test_too_many_bad_samples_are_summarised_by_reason_with_their_keys(tmp_path):
    """Old behaviour: `Reasons: {'/path/dataset.json': 2}` - grouped by the file that names them."""
    data = generate_synthetic(tmp_path / "syn", n_per_class=3, size=32, seed=1, classes=["beach", "forest"])
    doc = json.loads((data / "dataset.json").read_text())
    for im in doc["images"][:2]:
        im["sentences"] = []
    doc["images"][2]["sentences"] = [{"raw": " "}, {"raw": ""}]
    (data / "dataset.json").write_text(json.dumps(doc))
    (data / "images" / doc["images"][3]["filename"]).unlink()
    with pytest.raises(TooManyBadSamplesError) as err:
        shard_dataset(data, str(tmp_path / "out"), progress=False)
    message = str(err.value)
    keys = [load_key(data, im["filename"]) for im in doc["images"][:4]]
    two = re.search(r'"no captions; sample quarantined" x 2 \((\S+), (\S+)\)', message)
    assert two is not None and sorted(two.groups()) == sorted(keys[:2])
    assert f'"N of N captions empty or whitespace-only; sample quarantined" x 1 ({keys[2]})' in message
    assert f'"image file not found" x 1 ({keys[3]})' in message
    assert "{'" not in message and "dataset.json': " not in message


def load_key(data: Path, filename: str) -> str:
    from ssjdn.data.record import make_key

    return make_key(json.loads((data / "dataset.json").read_text())["dataset"], filename)


def test_default_options_leave_the_shard_digest_unchanged(world, tmp_path):
    """The new options are not output options: defaults give the same `output_options()` (and so the same plan
    digests and shards) as before, and so do non-default values."""
    before = {
        "maxcount": 1000,
        "maxsize": 1_000_000_000,
        "shuffle_seed": None,
        "splits": None,
        "resize": None,
        "reencode": None,
        "validate": "structure",
    }
    assert ShardOptions().output_options() == before
    opts = ShardOptions(allow_root=(str(world["outside"]),), follow_symlinks=True)
    assert opts.output_options() == before and opts.allow_root == (str(world["outside"]),)
    with pytest.raises(ShardOptionsError, match="--allow-root .* is not a local folder"):
        ShardOptions(allow_root=(str(tmp_path / "nope"),))
    with pytest.raises(ShardOptionsError, match="not a local folder"):
        ShardOptions(allow_root=("s3://bucket/x",))
    a = shard_dataset(world["data"], str(tmp_path / "a"), progress=False)
    b = shard_dataset(world["data"], str(tmp_path / "b"), follow_symlinks=True, progress=False)
    assert [e["sha256"] for e in a.manifest["shards"]] == [e["sha256"] for e in b.manifest["shards"]]
    assert [e["digest"] for e in a.manifest["shards"]] == [e["digest"] for e in b.manifest["shards"]]
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
