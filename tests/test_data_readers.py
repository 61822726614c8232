"""Dataset readers: Karpathy JSON, precomp text files, generic tables; format detection; labels; and every bad-input
case from issue 2 (each refused or quarantined with a message naming the file and record)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ssjdn.data.errors import DatasetFormatError, NoDatasetDescriptionError
from ssjdn.data.readers import detect_format, load_dataset
from ssjdn.data.record import make_key


def karpathy(root: Path, images: list[dict], dataset: str | None = "tiny", name: str = "dataset.json") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    doc = {"images": images} if dataset is None else {"dataset": dataset, "images": images}
    (root / name).write_text(json.dumps(doc))
    return root


def img(filename: str, split: str = "train", captions=("a red roof .", "a big house ."), **more) -> dict:
    return {"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions], **more}


def precomp(root: Path, files: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (root / name).write_text("".join(f"{line}\n" for line in lines))
    return root


# --- Karpathy JSON -------------------------------------------------------------------------------------------


def test_karpathy_reads_samples_splits_and_sources(tmp_path):
    root = karpathy(tmp_path / "ds", [img("a_1.jpg"), img("b_1.jpg", "val"), img("sub/c_2.png", "test")])
    (root / "images").mkdir()
    ds = load_dataset(root)
    assert (ds.name, ds.format, ds.root, ds.image_root) == ("tiny", "karpathy", root, root / "images")
    assert [s.filename for s in ds.samples] == ["a_1.jpg", "b_1.jpg", "sub/c_2.png"]
    assert ds.samples[2].source == str(root / "images" / "sub" / "c_2.png")
    assert ds.samples[0].key == make_key("tiny", "a_1.jpg") and ds.samples[0].captions == ["a red roof .", "a big house ."]
    assert [s.filename for s in ds.by_split("val")] == ["b_1.jpg"]
    assert ds.split_counts() == {"train": 1, "val": 1, "test": 1}
    assert ds.classes == ["a", "b", "c"] and ds.samples[2].class_index == 2  # from the name prefixes
    with pytest.raises(ValueError, match="split 'dev'"):
        ds.by_split("dev")


def test_karpathy_name_falls_back_to_folder_and_can_be_overridden(tmp_path):
    root = karpathy(tmp_path / "my_set", [img("1.jpg")], dataset=None, name="dataset_mine.json")
    assert load_dataset(root).name == "my_set"
    assert load_dataset(root / "dataset_mine.json", name="other").samples[0].key == "other__1"


def test_tokens_used_when_raw_missing(tmp_path):
    root = karpathy(tmp_path, [{"filename": "1.jpg", "split": "train", "sentences": [{"tokens": ["two", "planes"]}]}])
    assert load_dataset(root).samples[0].captions == ["two planes"]


def test_images_default_to_dataset_folder_without_images_subfolder(tmp_path):
    root = karpathy(tmp_path, [img("1.jpg")])
    assert load_dataset(root).image_root == root
    other = tmp_path / "elsewhere"
    assert load_dataset(root, images=other).samples[0].source == str(other / "1.jpg")


# --- labels ---------------------------------------------------------------------------------------------------


def test_labels_file_beats_prefixes(tmp_path):
    root = karpathy(tmp_path, [img("airport_1.jpg"), img("2.jpg"), img("3.jpg")])
    (root / "labels.csv").write_text("filename,class\nairport_1.jpg,runway\n2.jpg,beach\n")
    ds = load_dataset(root)
    assert ds.classes == ["beach", "runway"]
    assert [(s.class_name, s.class_index) for s in ds.samples] == [("runway", 1), ("beach", 0), (None, None)]


def test_numeric_names_get_no_class_and_a_lone_prefix_is_not_a_class(tmp_path):
    ds = load_dataset(karpathy(tmp_path / "a", [img("airport_12.jpg"), img("00017.jpg"), img("dense_residential_3.jpg")]))
    assert [s.class_name for s in ds.samples] == ["airport", None, "dense_residential"]
    ds = load_dataset(karpathy(tmp_path / "b", [img("IMG_0001.jpg"), img("IMG_0002.jpg")]))
    assert ds.classes == [] and not any(s.labelled for s in ds.samples)


def test_conflicting_labels_rows(tmp_path):
    root = karpathy(tmp_path, [img("1.jpg")])
    (root / "labels.csv").write_text("filename,class\n1.jpg,beach\n1.jpg,forest\n")
    with pytest.raises(DatasetFormatError, match=r"labels\.csv: line 3: 1\.jpg labelled both 'beach' and 'forest'"):
        load_dataset(root)


# --- precomp --------------------------------------------------------------------------------------------------


def test_precomp_detects_per_image_and_per_caption_alignment(tmp_path):
    root = precomp(tmp_path / "toy_precomp", {
        "train_caps.txt": [f"train caption {i}" for i in range(6)],
        "train_filename.txt": ["airport_1.jpg", "beach_2.jpg"],  # 3 consecutive captions per name
        "test_caps.txt": ["t0", "t1", "t2", "t3"],
        "test_filename.txt": ["airport_9.jpg", "airport_9.jpg", "44.jpg", "44.jpg"],  # one name per caption
    })
    ds = load_dataset(root)
    assert ds.format == "precomp" and ds.name == "toy"
    assert [(s.filename, s.split, s.captions) for s in ds.samples] == [
        ("airport_1.jpg", "train", ["train caption 0", "train caption 1", "train caption 2"]),
        ("beach_2.jpg", "train", ["train caption 3", "train caption 4", "train caption 5"]),
        ("airport_9.jpg", "test", ["t0", "t1"]),
        ("44.jpg", "test", ["t2", "t3"]),
    ]
    assert ds.classes == ["airport", "beach"] and ds.samples[3].class_name is None


def test_precomp_verify_variant(tmp_path):
    root = precomp(tmp_path, {
        "train_caps.txt": ["a", "b"], "train_filename.txt": ["1.tif", "2.tif"],
        "train_caps_verify.txt": ["a"], "train_filename_verify.txt": ["1.tif"],
        "val_caps_verify.txt": ["b"], "val_filename_verify.txt": ["2.tif"],
        "test_caps.txt": ["c"], "test_filename.txt": ["3.tif"],
    })
    assert load_dataset(root).split_counts() == {"train": 2, "test": 1}
    assert load_dataset(root, format="precomp:verify").split_counts() == {"train": 1, "val": 1, "test": 1}


def test_precomp_misaligned_counts(tmp_path):
    root = precomp(tmp_path, {"train_caps.txt": ["a", "b", "c"], "train_filename.txt": ["1.jpg", "2.jpg"]})
    with pytest.raises(DatasetFormatError, match=r"train_caps\.txt: 3 caption lines do not align with 2 names"):
        load_dataset(root)


# --- tables ---------------------------------------------------------------------------------------------------


def test_csv_table_with_caption_columns_label_and_geo(tmp_path):
    (tmp_path / "captions.csv").write_text(
        "image,caption_1,caption_2,label,lat,lon,split,sensor\n"
        "tiles/a.png,a pond,a small pond,water,47.1,8.5,train,wv3\n"
        "tiles/b.png,a road,,road,,,test,wv3\n"
    )
    ds = load_dataset(tmp_path)
    assert ds.format == "table" and ds.name == tmp_path.name
    a, b = ds.samples
    assert (a.filename, a.captions, a.class_name, a.lat, a.lon, a.extra) == (
        "tiles/a.png", ["a pond", "a small pond"], "water", 47.1, 8.5, {"sensor": "wv3"})
    assert b.split == "test" and b.captions == ["a road"] and b.lat is None
    assert ds.classes == ["road", "water"]
    # The empty second caption of b is reported, not passed on.
    assert [q.filename for q in ds.quarantine] == ["tiles/b.png"] and ds.quarantine[0].sample is None


def test_jsonl_table_with_list_captions_urls_and_bbox(tmp_path):
    rows = [
        {"url": "s3://bucket/x/1.tif", "captions": ["one", "uno"], "bbox": [1, 2, 3, 4], "crs": "EPSG:32632"},
        {"url": "https://example.org/2.jpg", "captions": ["two"], "split": "val"},
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_dataset(tmp_path / "items.jsonl")
    one, two = ds.samples
    assert one.source == "s3://bucket/x/1.tif" and one.filename == "bucket/x/1.tif"
    assert one.bbox == (1.0, 2.0, 3.0, 4.0) and one.crs == "EPSG:32632" and one.split == "train"
    assert two.source == "https://example.org/2.jpg" and two.split == "val"


def test_parquet_table_long_format_rows_merge(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "filename": ["a.jpg", "a.jpg", "b.jpg"],
        "text": ["first", "second", "third"],
        "class": ["x", "x", "y"],
    })
    pq.write_table(table, tmp_path / "data.parquet")
    ds = load_dataset(tmp_path, format="table")
    assert [(s.filename, s.captions, s.class_name) for s in ds.samples] == [
        ("a.jpg", ["first", "second"], "x"), ("b.jpg", ["third"], "y")]


def test_table_rows_for_one_image_must_agree(tmp_path):
    (tmp_path / "t.csv").write_text("image,caption,split\na.jpg,one,train\na.jpg,two,test\n")
    with pytest.raises(DatasetFormatError, match=r"t\.csv: line 3: image 'a\.jpg' listed again with split 'test'"):
        load_dataset(tmp_path)


def test_table_without_caption_column(tmp_path):
    (tmp_path / "t.csv").write_text("image,notes\na.jpg,hello\n")
    with pytest.raises(DatasetFormatError, match=r"t\.csv: needs an image column .* found \['image', 'notes'\]"):
        load_dataset(tmp_path)


# --- detection ------------------------------------------------------------------------------------------------


def test_detection_and_ambiguity(tmp_path):
    karpathy(tmp_path, [img("1.jpg")])
    assert detect_format(tmp_path) == ("karpathy", tmp_path / "dataset.json")
    (tmp_path / "extra.csv").write_text("image,caption\n1.jpg,x\n")
    with pytest.raises(DatasetFormatError, match=r"several dataset descriptions found: karpathy \(dataset\.json\), "
                                                 r"table \(extra\.csv\)"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, format="table").format == "table"
    (tmp_path / "images").mkdir()
    with pytest.raises(NoDatasetDescriptionError, match="no dataset description found"):
        load_dataset(tmp_path / "images")


# --- bad input ------------------------------------------------------------------------------------------------


def test_malformed_json_names_line_and_column(tmp_path):
    # The parser (ijson's yajl) stops at the "a" of `train`, where the text can no longer be the literal `true`.
    (tmp_path / "dataset.json").write_text('{"images": [\n  {"filename": "1.jpg",\n   "split": train}\n]}')
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: malformed JSON at line 3, column 15 \(byte offset 51\): "
                                                 r"lexical error: invalid string in json text$"):
        load_dataset(tmp_path)


def test_malformed_jsonl_names_line_and_column(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg" "caption": "y"}\n')
    with pytest.raises(DatasetFormatError, match=r"t\.jsonl: malformed JSON at line 2, column 19"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("split", ["restval", "dev", "Train", ""])
def test_unknown_split_in_karpathy(tmp_path, split):
    karpathy(tmp_path, [img("1.jpg"), img("2.jpg", split)])
    with pytest.raises(DatasetFormatError,
                       match=rf"dataset\.json: images\[1\] \(2\.jpg\): split '{split}' is not one of train, val, test"):
        load_dataset(tmp_path)


def test_unknown_split_in_precomp_and_table(tmp_path):
    root = precomp(tmp_path / "p", {"dev_caps.txt": ["a"], "dev_filename.txt": ["1.jpg"]})
    with pytest.raises(DatasetFormatError, match=r"dev_filename\.txt: line 1 \(1\.jpg\): split 'dev' is not one of"):
        load_dataset(root)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "t.csv").write_text("image,caption,split\na.jpg,x,holdout\n")
    with pytest.raises(DatasetFormatError, match=r"t\.csv: line 2 \(a\.jpg\): split 'holdout'"):
        load_dataset(tmp_path / "t")


def test_empty_and_whitespace_captions_are_quarantined_and_named(tmp_path):
    karpathy(tmp_path, [
        img("1.jpg", captions=["fine", "   "]),
        img("2.jpg", captions=["", " \t "]),
        img("3.jpg", captions=[]),
        img("4.jpg"),
    ])
    ds = load_dataset(tmp_path)
    assert [s.filename for s in ds.samples] == ["1.jpg", "4.jpg"]
    assert ds.samples[0].captions == ["fine"]
    messages = [q.message for q in ds.quarantine]
    assert messages[0].endswith("dataset.json: images[0] (1.jpg): 1 of 2 captions empty or whitespace-only "
                                "(sentences[1])")
    assert "images[1] (2.jpg): 2 of 2 captions empty or whitespace-only (sentences[0] to sentences[1]); " \
           "sample quarantined" in messages[1]
    assert "images[2] (3.jpg): no captions; sample quarantined" in messages[2]
    assert [s.filename for s in ds.dropped_samples] == ["2.jpg", "3.jpg"]


def test_empty_precomp_caption_lines_are_quarantined_with_line_numbers(tmp_path):
    root = precomp(tmp_path, {"train_caps.txt": ["a", "b", "", " "], "train_filename.txt": ["1.tif", "2.tif"]})
    ds = load_dataset(root)
    assert [s.filename for s in ds.samples] == ["1.tif"]
    assert ds.quarantine[0].message.endswith(
        "train_filename.txt: line 2 (2.tif): 2 of 2 captions empty or whitespace-only "
        "(train_caps.txt line 3 to train_caps.txt line 4); sample quarantined (no usable caption)")


def test_non_utf8_caption_file_names_byte_offset(tmp_path):
    root = precomp(tmp_path, {"train_filename.txt": ["1.jpg", "2.jpg"]})
    (root / "train_caps.txt").write_bytes(b"a clean caption\nun caf\xe9 au bord\n")
    with pytest.raises(DatasetFormatError, match=r"train_caps\.txt: not valid UTF-8 at byte offset 22 \(line 2\)"):
        load_dataset(root)
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "dataset.json").write_bytes(b'{"images": [{"filename": "\xff.jpg"}]}')
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: not valid UTF-8 at byte offset 26 \(line 1\)"):
        load_dataset(tmp_path / "k")


@pytest.mark.parametrize("name", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:/x.jpg", "..\\x.jpg", "~/x.jpg"])
def test_names_escaping_the_root_are_refused(tmp_path, name):
    karpathy(tmp_path / "k", [img("1.jpg"), img(name)])
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: images\[1\]: image file name .* (escapes|absolute)"):
        load_dataset(tmp_path / "k")
    root = precomp(tmp_path / "p", {"train_caps.txt": ["a"], "train_filename.txt": [name]})
    with pytest.raises(DatasetFormatError, match=r"train_filename\.txt: line 1: image file name"):
        load_dataset(root)
    (tmp_path / "t").mkdir(exist_ok=True)
    (tmp_path / "t" / "t.jsonl").write_text(json.dumps({"image": name, "caption": "x"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"t\.jsonl: line 1: image file name"):
        load_dataset(tmp_path / "t")


def test_file_url_in_table_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("url,caption\nfile:///etc/passwd,x\n")
    with pytest.raises(DatasetFormatError, match=r"t\.csv: line 2: file:// URL"):
        load_dataset(tmp_path)


def test_harmless_dots_are_normalised(tmp_path):
    karpathy(tmp_path, [img("./sub/./1.jpg")])
    assert load_dataset(tmp_path).samples[0].filename == "sub/1.jpg"


def test_duplicate_file_names_are_refused(tmp_path):
    karpathy(tmp_path / "k", [img("1.jpg"), img("2.jpg"), img("1.jpg", "test")])
    with pytest.raises(DatasetFormatError, match=r"images\[2\]: duplicate image file name '1\.jpg' \(first listed "
                                                 r"at .*dataset\.json: images\[0\], split train; this one split test\)"):
        load_dataset(tmp_path / "k")
    root = precomp(tmp_path / "p", {"train_caps.txt": ["a", "b", "c", "d"], "train_filename.txt": ["1.jpg", "1.jpg"],
                                    "test_caps.txt": ["c"], "test_filename.txt": ["9.jpg"]})
    with pytest.raises(DatasetFormatError, match=r"train_filename\.txt: line 2: duplicate image file name '1\.jpg'"):
        load_dataset(root)
    # Per-caption lists: a name coming back after other names is a duplicate, not more captions.
    root = precomp(tmp_path / "q", {"test_caps.txt": ["a", "b", "c"], "test_filename.txt": ["1.jpg", "2.jpg", "1.jpg"]})
    with pytest.raises(DatasetFormatError, match=r"test_filename\.txt: line 3: duplicate image file name '1\.jpg'"):
        load_dataset(root)
    # The same image in two splits.
    root = precomp(tmp_path / "r", {"train_caps.txt": ["a"], "train_filename.txt": ["1.jpg"],
                                    "test_caps.txt": ["b"], "test_filename.txt": ["1.jpg"]})
    with pytest.raises(DatasetFormatError, match=r"test_filename\.txt: line 1: duplicate image file name '1\.jpg'"):
        load_dataset(root)


def test_names_colliding_on_sample_key_are_refused(tmp_path):
    karpathy(tmp_path, [img("1.jpg"), img("1.tif")])
    with pytest.raises(DatasetFormatError, match=r"'1\.jpg' and '1\.tif' map to the same sample key 'tiny__1'"):
        load_dataset(tmp_path)


# --- real data (integration) ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_ucm(ucm_dir):
    ds = load_dataset(ucm_dir)
    assert (ds.name, len(ds.samples), len(ds.classes)) == ("ucm", 2000, 21)
    assert ds.split_counts() == {"train": 1680, "val": 110, "test": 210}
    # README: class index (N-1)//100 in alphabetical order.
    assert all(s.class_index == (int(s.filename.split(".")[0]) - 1) // 100 for s in ds.samples)
    assert all(Path(s.source).is_file() for s in ds.samples[:50])


@pytest.mark.integration
def test_real_precomp_sets(precomp_dir):
    rsicd = load_dataset(precomp_dir / "rsicd_precomp")
    assert rsicd.split_counts() == {"train": 9828, "test": 1093} and len(rsicd.classes) == 30
    numeric = [s for s in rsicd.samples if s.filename.split(".")[0].isdigit()]
    assert numeric and all(s.class_name is None for s in numeric)
    assert sum(not s.labelled for s in rsicd.samples) == len(numeric)
    rsitmd = load_dataset(precomp_dir / "rsitmd_precomp")
    assert {q.filename for q in rsitmd.quarantine} == {
        "mountain_2378.tif", "railwaystation_3254.tif", "storagetanks_4367.tif", "viaduct_4635.tif"}
    assert len(rsitmd.samples) + len(rsitmd.dropped_samples) == 4743
    sydney = load_dataset(precomp_dir / "sydney_precomp", format="precomp:verify")
    assert sydney.split_counts() == {"train": 397, "val": 100, "test": 58} and sydney.classes == []


def test_parquet_rows_of_one_image_merge_across_insert_batches(tmp_path, monkeypatch):
    """A repeated image whose rows land in different insert batches is merged from the index, like within one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ssjdn.data.readers import index

    pq.write_table(
        pa.table({"filename": ["a.jpg", "b.jpg", "a.jpg"], "text": ["one", "two", "three"], "class": ["x", "y", "x"]}),
        tmp_path / "data.parquet",
    )
    monkeypatch.setattr(index, "_BATCH", 1)
    ds = load_dataset(tmp_path, format="table")
    assert [(s.filename, s.captions) for s in ds.samples] == [("a.jpg", ["one", "three"]), ("b.jpg", ["two"])]


def _stream(path, monkeypatch=None, chunk=None):
    from ssjdn.data.readers import jsonstream

    if chunk is not None:
        monkeypatch.setattr(jsonstream, "CHUNK_BYTES", chunk)
        monkeypatch.setattr(jsonstream, "HEAD_CHUNK_BYTES", chunk)
    fields: dict = {}
    return list(jsonstream.stream_object_array(path, "images", fields)), fields


@pytest.mark.parametrize("chunk", [64, 4096, None])
def test_karpathy_file_is_parsed_in_bounded_pieces(tmp_path, chunk, monkeypatch):
    """The caption file is read in pieces of at most `chunk` bytes and decoded one image object at a time, with
    exactly json.loads's result; what is held at once is a read's worth of items plus ~70 KB (tracemalloc), not the
    file."""
    import tracemalloc

    from ssjdn.data.readers import jsonstream

    images = [img(f"c{i % 3}_{i}.jpg", captions=[f"caption {i} é \"q\" \\ \u2603", "  "], lat=0.25 * i, n=10**15 + i)
              for i in range(3000)]
    doc = {"images": images, "dataset": "late_name"}  # the name comes after the images
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    (tmp_path / "dataset.json").write_text(text, encoding="utf-8")
    assert _stream(tmp_path / "dataset.json", monkeypatch, chunk) == (images, {"dataset": "late_name"})

    biggest = [0]
    read = jsonstream._Reader.read

    def watched_read(self, n=-1):
        data = read(self, n)
        biggest[0] = max(biggest[0], len(data))
        return data

    monkeypatch.setattr(jsonstream._Reader, "read", watched_read)
    tracemalloc.start()
    try:
        count = sum(1 for _ in jsonstream.stream_object_array(tmp_path / "dataset.json", "images", {}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 3000 and biggest[0] == (chunk or jsonstream.CHUNK_BYTES)
    if chunk is not None:  # reads of 64 KiB hold ~1 MiB of items at once: more than this whole test file
        assert peak < len(text.encode()) / 5, (peak, len(text))
    ds = load_dataset(tmp_path)
    assert ds.name == "late_name" and len(ds) == 3000 and ds.samples[0].key == "late_name__c0_0"


@pytest.mark.parametrize("chunk", [16, 1000, None])
def test_malformed_karpathy_file_names_position_and_reason(tmp_path, chunk, monkeypatch):
    """Whatever the read size, an error names the file, the line, column (characters) and byte offset where the
    parser stopped (within or at the end of the offending token; at the end of the file when it ends too early) and
    its reason, on one line."""
    images = [img(f"c{i}.jpg", captions=[f"caption {i} é"]) for i in range(300)]
    text = json.dumps({"images": images, "dataset": "late_name"}, indent=1, ensure_ascii=False)
    colon = text.replace('"split": "train"', '"split" "train"', 1)
    cases = [  # (document, the character where the parser stops, reason)
        (text[:-3], len(text) - 3, "parse error: premature EOF"),  # cut inside the last string
        (colon, colon.index('"split" "train"') + len('"split" "train'),  # at the end of the unexpected token
         "parse error: object key and value must be separated by a colon (':')"),
        (text + " x", len(text) + 1, "parse error: trailing garbage"),
        ("\ufeff" + text.replace("caption 7 é", "caption 7 é\x01"), text.index("caption 7 é") + 11 + 1,
         "lexical error: invalid character inside string"),  # a control character in a string; BOM not counted
    ]
    for broken, char, reason in cases:
        path = tmp_path / "dataset.json"
        path.write_text(broken, encoding="utf-8")
        data = broken.encode()
        offset = len(broken[:char].encode())
        line = broken[:char].count("\n") + 1
        column = char - (broken.rfind("\n", 0, char) + 1) + 1 - (line == 1 and broken.startswith("\ufeff"))
        with pytest.raises(DatasetFormatError) as err:
            _stream(path, monkeypatch, chunk)
        assert str(err.value) == (f"{path}: malformed JSON at line {line}, column {column} (byte offset {offset}): "
                                  f"{reason}")
        assert data[offset : offset + 1] in (broken[char : char + 1].encode(), b"")
        with pytest.raises(json.JSONDecodeError) as ref:
            json.loads(broken.removeprefix("\ufeff"))
        if "garbage" in reason:  # a one-character token: json.loads names the same character
            assert ref.value.pos == char
        with pytest.raises(DatasetFormatError, match=re.escape(f"malformed JSON at line {line}, column {column}")):
            load_dataset(tmp_path)


def test_json_members_after_the_array_are_kept_whatever_their_size(tmp_path, monkeypatch):
    """Members after the array are read from the bytes after its last item; when they are longer than the part
    of the file read byte by byte (or the array is empty, or ends with a scalar), the file is walked again."""
    from ssjdn.data.readers import jsonstream

    walks = []
    walk = jsonstream._walk
    monkeypatch.setattr(jsonstream, "_walk", lambda *a, head_only: walks.append(head_only) or walk(*a, head_only=head_only))
    big = {"notes": ["x" * 50] * 200, "n": [1, 2.5, None, True]}
    small_tail = {"dataset": "first", "images": [[1, {"k": "]}"}]], "x": "]}", "dataset ": 2}
    for doc, second_walk in (  # {TAIL_BYTES: whether the file is walked again}
        ({"images": [img("a.jpg"), img("b.jpg")], "info": big, "dataset": "d"}, {8: True, 1024: True, 1 << 20: False}),
        (small_tail, {8: True, 1024: False, 1 << 20: False}),
        ({"info": big, "images": [], "dataset": "d"}, {8: True, 1024: True, 1 << 20: True}),
        ({"images": [img("a.jpg"), 7], "dataset": "d"}, {8: True, 1024: True, 1 << 20: True}),
    ):
        (tmp_path / "dataset.json").write_text(json.dumps(doc))
        expected_fields = {k: v for k, v in doc.items() if k != "images"}
        for tail, again in second_walk.items():
            monkeypatch.setattr(jsonstream, "TAIL_BYTES", tail)
            walks.clear()
            assert _stream(tmp_path / "dataset.json") == (doc["images"], expected_fields)
            assert walks == ([True, False] if again else [True]), (doc, tail)


@pytest.mark.parametrize("text, message", [
    ("", r"expected a JSON object with an 'images' list, found empty file"),
    ("\ufeff \n", r"expected a JSON object with an 'images' list, found empty file"),
    ('[{"filename": "a.jpg"}]', r"expected a JSON object with an 'images' list, found a JSON value that is not an object"),
    ('{"dataset": "x"}', r"expected a JSON object with an 'images' list$"),
    ('{"images": {"a.jpg": {}}}', r"'images' must be a list"),
    ('{"images": [{"lat": NaN}]}', r"malformed JSON at line 1, column 21 \(byte offset 20\): lexical error: invalid char"),
    ('{"images": [{"id": 123456789012345678901234567890}]}',
     r"malformed JSON at line 1, column 50 \(byte offset 49\): parse error: integer overflow"),
])  # fmt: skip
def test_json_document_shape_errors(tmp_path, text, message):
    (tmp_path / "dataset.json").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: " + message):
        _stream(tmp_path / "dataset.json")


def test_json_streaming_uses_ijsons_c_backend_and_works_with_the_python_one(tmp_path, monkeypatch):
    import ijson

    from ssjdn.data.readers import jsonstream

    try:
        ijson.get_backend("yajl2_c")  # ijson's wheels include it
    except ImportError:
        assert jsonstream.BACKEND.backend == ijson.backend
    else:
        assert jsonstream.BACKEND.backend == "yajl2_c"
    doc = {"images": [img("a.jpg", lat=1.5), img("b.jpg")], "dataset": "d"}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    monkeypatch.setattr(jsonstream, "BACKEND", ijson.get_backend("python"))
    assert _stream(tmp_path / "dataset.json") == (doc["images"], {"dataset": "d"})
    (tmp_path / "dataset.json").write_text(json.dumps(doc)[:-5])
    with pytest.raises(DatasetFormatError,
                       match=r"dataset\.json: malformed JSON at line 1, column \d+ \(byte offset \d+\): \S"):
        _stream(tmp_path / "dataset.json")


def test_labels_file_rows_are_checked_across_insert_batches(tmp_path, monkeypatch):
    """labels.csv is streamed into the index: a repeated identical row is fine, a second class for a file is refused
    with both classes and the line, however the rows fall into insert batches."""
    from ssjdn.data.readers import index

    monkeypatch.setattr(index, "_BATCH", 1)
    root = karpathy(tmp_path, [img("1.jpg"), img("2.jpg"), img("x_3.jpg")])
    (root / "labels.csv").write_text("filename,class\n1.jpg,beach\n2.jpg,forest\n1.jpg,beach\n")
    ds = load_dataset(root)
    assert [(s.filename, s.class_name) for s in ds.samples] == [("1.jpg", "beach"), ("2.jpg", "forest"), ("x_3.jpg", None)]
    (root / "labels.csv").write_text("filename,class\n1.jpg,beach\n2.jpg,forest\n\n1.jpg,forest\n")
    with pytest.raises(DatasetFormatError, match=r"labels\.csv: line 5: 1\.jpg labelled both 'beach' and 'forest'"):
        load_dataset(root)
