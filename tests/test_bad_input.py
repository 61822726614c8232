"""No command ends in a traceback for bad input: a table of bad inputs through the CLI entry point, in process.

Each case must exit 1 or 2 with one line on stderr that names what is wrong (a file, a value, an option), and
nothing that looks like a traceback. Cases that need Ray or a trained model are elsewhere; these cost seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ssjdn.data.synthetic import generate_synthetic
from ssjdn_cli.main import main
from tests.embed_helpers import dataset_captions, make_tiny_checkpoint
from tests.geo_store_data import write_geo_version, write_plain_version


class _Evil:
    """Unpickling it creates a file: the proof that a checkpoint was unpickled unsafely."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    data = generate_synthetic(root / "syn", n_per_class=2, size=32, seed=3)
    (root / "empty.json").write_text("")
    (root / "broken.json").write_text('{"images": [{"filename": "a.jpg", ')
    (root / "not-a-dataset").mkdir()
    (root / "notes.txt").write_text("hello")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not a png")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "empty-archive").mkdir()
    (root / "stac").mkdir()
    (root / "stac" / "catalog.json").write_text('{"type": "Catalog", "stac_version": "1.0.0", "id": "c", "links": []}')
    (root / "unknown-key.yaml").write_text("no_such_section:\n  x: 1\n")
    ckpt = make_tiny_checkpoint(root / "tiny.pt", dataset_captions(data))
    (root / "junk.pt").write_bytes(b"\x80\x04not a checkpoint at all")
    # A store version whose manifest is cut in the middle.
    store = root / "store"
    (store / "abc123").mkdir(parents=True)
    (store / "abc123" / "_manifest.json").write_text('{"format": "ssjdn-embedding-store/1", "generation": ')
    # Shards whose manifest lists a path outside the folder.
    shards = root / "shards"
    (shards / "train").mkdir(parents=True)
    (shards / "_manifest.json").write_text(
        json.dumps(
            {
                "format": "ssjdn-webdataset-shards/1",
                "dataset": {"name": "evil"},
                "splits": {"train": {"samples": 1, "shards": 1}},
                "shards": [{"split": "train", "path": "../../etc/passwd", "samples": 1}],
                "totals": {"samples": 1, "shards": 1},
                "classes": [],
            }
        )
    )
    # A table whose image is a local: URL outside the dataset (issue 19).
    (root / "localurl").mkdir()
    (root / "localurl" / "t.csv").write_text("image,caption\nlocal:///etc/hostname,x\n")
    # train-local --resume from a last.pt that is a malicious pickle, and from one of another config (issue 19).
    evil = root / "evil-run"
    evil.mkdir()
    torch.save({"format": "ssjdn-checkpoint/1", "x": _Evil(str(root / "pwned"))}, evil / "last.pt")
    othercfg = root / "other-config-run"
    othercfg.mkdir()
    make_tiny_checkpoint(othercfg / "last.pt", dataset_captions(data), overrides={"model.embed_dim": 24})
    # Store versions for the geo filters: one with chips' footprints, one of benchmark rows only.
    write_geo_version(str(root / "geo-store"), chips=30, plain=5)
    write_plain_version(str(root / "plain-store"))
    conflict = root / "conflict"  # a destination already holding another dataset's shards
    assert main(["shard", str(data), str(conflict), "--maxcount", "5", "--no-progress"]) == 0
    other = generate_synthetic(root / "other", n_per_class=1, size=32, seed=9)
    return {
        "root": root,
        "data": data,
        "other": other,
        "ckpt": ckpt,
        "store": store,
        "shards": shards,
        "conflict": conflict,
        "geo": root / "geo-store",
        "plain": root / "plain-store",
    }


def _cases():
    r = "{root}"
    return [
        # data describe
        ("describe a missing folder", ["data", "describe", f"{r}/nope"], "nope"),
        ("describe an empty json", ["data", "describe", f"{r}/empty.json"], "empty.json"),
        ("describe a truncated json", ["data", "describe", f"{r}/broken.json"], "broken.json"),
        ("describe a folder without a dataset", ["data", "describe", f"{r}/not-a-dataset"], "not-a-dataset"),
        ("describe a text file", ["data", "describe", f"{r}/notes.txt"], "notes.txt"),
        ("describe with an unknown format", ["data", "describe", "{data}", "--format", "xml"], "xml"),
        # shard
        ("shard a missing dataset", ["shard", f"{r}/nope", f"{r}/out1"], "nope"),
        ("shard a truncated json", ["shard", f"{r}/broken.json", f"{r}/out2"], "broken.json"),
        ("shard with maxcount 0", ["shard", "{data}", f"{r}/out3", "--maxcount", "0"], "maxcount"),
        ("shard with maxcount 1.5", ["shard", "{data}", f"{r}/out4", "--maxcount", "1.5"], "1.5"),
        ("shard with an unknown split", ["shard", "{data}", f"{r}/out5", "--splits", "dev"], "dev"),
        ("shard with an empty split list", ["shard", "{data}", f"{r}/out6", "--splits", ","], "splits"),
        ("shard with bad-fraction 2", ["shard", "{data}", f"{r}/out7", "--max-bad-fraction", "2"], "2"),
        ("shard with an unknown reencode", ["shard", "{data}", f"{r}/out8", "--reencode", "bmp"], "bmp"),
        ("shard with an unknown validation", ["shard", "{data}", f"{r}/out9", "--validate", "pixels"], "pixels"),
        ("shard with a bad storage option", ["shard", "{data}", f"{r}/o10", "--storage-option", "novalue"], "novalue"),
        ("shard into another dataset's shards", ["shard", "{other}", "{conflict}", "--no-progress"], "conflict"),
        ("shard with workers 0", ["shard", "{data}", f"{r}/o11", "--workers", "0"], "workers"),
        ("shard with an unknown option", ["shard", "{data}", f"{r}/o12", "--max-count", "3"], "max-count"),
        ("shard a table with a local URL outside the dataset", ["shard", f"{r}/localurl", f"{r}/o13"], "local:///etc/hostname"),
        ("shard with an allowed root that is no folder", ["shard", "{data}", f"{r}/o14", "--allow-root", f"{r}/nope"], "nope"),
        ("describe a table with a local URL outside the dataset", ["data", "describe", f"{r}/localurl"], "local:///etc/hostname"),
        # train-local
        ("train-local with a missing config", ["train-local", "--config", "nope", "--data", "{data}", "--out", f"{r}/t1"], "nope"),
        ("train-local with a broken config", ["train-local", "--config", f"{r}/bad.yaml", "--data", "{data}", "--out", f"{r}/t2"], "bad.yaml"),
        ("train-local with an unknown key", ["train-local", "--config", f"{r}/unknown-key.yaml", "--data", "{data}", "--out", f"{r}/t3"], "no_such_section"),
        ("train-local with a bad override", ["train-local", "--config", "tiny", "--set", "train.nope=1", "--data", "{data}", "--out", f"{r}/t4"], "train.nope"),
        ("train-local with a malformed override", ["train-local", "--config", "tiny", "--set", "novalue", "--data", "{data}", "--out", f"{r}/t5"], "novalue"),
        ("train-local on a missing dataset", ["train-local", "--config", "tiny", "--data", f"{r}/nope", "--out", f"{r}/t6"], "nope"),
        ("train-local resuming from a malicious pickle", ["train-local", "--config", "tiny", "--data", "{data}", "--out", f"{r}/evil-run", "--resume", "--set", "model.lsd=false"], "last.pt"),
        ("train-local resuming from another config's checkpoint", ["train-local", "--config", "tiny", "--data", "{data}", "--out", f"{r}/other-config-run", "--resume", "--set", "model.lsd=false"], "model.embed_dim"),
        ("train-local with a class count the dataset does not have", ["train-local", "--config", "tiny", "--data", "{data}", "--out", f"{r}/t7"], "num_classes"),
        # train (fails in preflight, before Ray starts)
        ("train on missing shards", ["train", "--config", "tiny", "--shards", f"{r}/nope", "--storage", f"{r}/runs"], "nope"),
        ("train on an unsafe shard manifest", ["train", "--config", "tiny", "--shards", "{shards}", "--storage", f"{r}/runs"], "passwd"),
        ("train with an unknown config", ["train", "--config", "nope", "--shards", "{shards}", "--storage", f"{r}/runs"], "nope"),
        ("train with workers 0", ["train", "--config", "tiny", "--shards", "{shards}", "--storage", f"{r}/runs", "--workers", "0"], "workers"),
        # embed (fails before Ray starts)
        ("embed with a missing checkpoint", ["embed", "{data}", f"{r}/s1", "--checkpoint", f"{r}/missing.pt"], "missing.pt"),
        ("embed with a junk checkpoint", ["embed", "{data}", f"{r}/s2", "--checkpoint", f"{r}/junk.pt"], "junk.pt"),
        ("embed with a checkpoint folder that holds none", ["embed", "{data}", f"{r}/s3", "--checkpoint", f"{r}/not-a-dataset"], "not-a-dataset"),
        ("embed with an unknown dtype", ["embed", "{data}", f"{r}/s4", "--checkpoint", "{ckpt}", "--dtype", "int8"], "int8"),
        ("embed with batch size 0", ["embed", "{data}", f"{r}/s5", "--checkpoint", "{ckpt}", "--batch-size", "0"], "0"),
        ("embed a folder with nothing to embed", ["embed", f"{r}/empty-archive", f"{r}/s6", "--checkpoint", "{ckpt}"], "found no shards"),
        ("embed a STAC catalog not tiled yet", ["embed", f"{r}/stac/catalog.json", f"{r}/s7", "--checkpoint", "{ckpt}"], "tile its scenes first"),
        # query
        ("query a store that does not exist", ["query", "a beach", "--store", f"{r}/no-store"], "no-store"),
        ("query a store with a truncated manifest", ["query", "a beach", "--store", "{store}"], "_manifest.json"),
        ("query with k 0", ["query", "a beach", "--store", "{store}", "-k", "0"], "0"),
        ("query with an empty image", ["query", "--image", f"{r}/empty.jpg", "--store", "{store}"], "empty.jpg"),
        ("query with a text file as image", ["query", "--image", f"{r}/text.png", "--store", "{store}"], "text.png"),
        ("query with a missing image", ["query", "--image", f"{r}/nope.jpg", "--store", "{store}"], "nope.jpg"),
        ("query with neither text nor image", ["query", "--store", "{store}"], "text"),
        ("query with an unknown command", ["quer", "a beach"], "quer"),
        # query: geo and time filters (vector queries by place: no model needed)
        ("query with a box of three numbers", ["query", "--image-at", "0,0", "--store", "{geo}", "--bbox=1,2,3"], "--bbox"),
        ("query with a box latitude outside [-90, 90]", ["query", "--image-at", "0,0", "--store", "{geo}", "--bbox=0,-95,1,1"], "-95"),
        ("query with a NaN in the box", ["query", "--image-at", "0,0", "--store", "{geo}", "--bbox=nan,0,1,1"], "MINLON"),
        ("query with a negative radius", ["query", "--image-at", "0,0", "--store", "{geo}", "--near=0,0", "--radius-km=-1"], "negative"),
        ("query with an absurd radius", ["query", "--image-at", "0,0", "--store", "{geo}", "--near=0,0", "--radius-km=99999"], "99999"),
        ("query with --near without a radius", ["query", "--image-at", "0,0", "--store", "{geo}", "--near=0,0"], "--radius-km"),
        ("query with an unparseable date", ["query", "--image-at", "0,0", "--store", "{geo}", "--after", "2024-13-01"], "2024-13-01"),
        ("query with after later than before", ["query", "--image-at", "0,0", "--store", "{geo}", "--after", "2024-06-01", "--before", "2024-05-01"], "later than"),
        ("query by place on a version without footprints", ["query", "--image-at", "0,0", "--store", "{plain}"], "no footprints"),
        ("query by place where no chip lies", ["query", "--image-at", "0,-89.99999", "--store", "{geo}"], "--image-at"),
        ("query by place with a latitude of 91", ["query", "--image-at", "0,91", "--store", "{geo}"], "91"),
    ]


CASES = _cases()


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("what", "argv", "named"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_no_traceback(corpus, capsys, what, argv, named):
    values = {k: str(v) for k, v in corpus.items()}
    argv = [a.format(**values) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage + one error line, exit 2
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (1, 2), f"{what}: exit {code}\n{out}\n{err}"
    assert "Traceback" not in out + err, f"{what}:\n{err}"
    error_lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert error_lines, f"{what}: no error line on stderr:\n{err}"
    assert named.format(**values) in error_lines[-1], f"{what}: the error does not name {named!r}: {error_lines}"
    shutil.rmtree(Path(values["root"]) / "runs", ignore_errors=True)
    assert not (Path(values["root"]) / "pwned").exists(), f"{what}: a pickle was unpickled"
