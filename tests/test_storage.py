"""pipelines.storage: URL -> filesystem, storage options, safe joins, atomic writes (local and S3), retries."""

from __future__ import annotations

import logging
import os

import pytest

from pipelines import fsio as storage
from pipelines.fsio import (
    StorageError,
    UnsafePathError,
    atomic_open,
    atomic_write_bytes,
    get_fs,
    parse_storage_options,
    redact,
    safe_join,
    with_retries,
)


def test_parse_storage_options_nests_and_coerces():
    opts = parse_storage_options(
        [
            "anon=true",
            "default_block_size=8388608",
            "client_kwargs.region_name=eu-west-1",
            "endpoint_url=http://h:9",
        ]
    )
    assert opts == {
        "anon": True,
        "default_block_size": 8388608,
        "client_kwargs": {"region_name": "eu-west-1"},
        "endpoint_url": "http://h:9",
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_storage_options(["novalue"])


def test_redact_masks_credentials_but_keeps_endpoint():
    shown = redact(
        {
            "key": "AKIA",
            "secret": "s3cr3t",
            "endpoint_url": "http://x",
            "client_kwargs": {"aws_session_token": "t"},
        }
    )
    assert shown == {
        "key": "***",
        "secret": "***",
        "endpoint_url": "http://x",
        "client_kwargs": {"aws_session_token": "***"},
    }


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "s3://other/x", "a\\..\\b", ""])
def test_safe_join_refuses_escapes(bad):
    with pytest.raises(UnsafePathError):
        safe_join("/data/root", bad)


def test_safe_join_joins_relative_parts():
    assert safe_join("bucket/prefix/", "train", "shard-000000.tar") == "bucket/prefix/train/shard-000000.tar"
    assert safe_join("/r", "./a//b") == "/r/a/b"


def test_atomic_write_local_commits_whole_file_or_nothing(tmp_path):
    fs, root = get_fs(str(tmp_path))
    target = safe_join(root, "out", "file.bin")
    atomic_write_bytes(fs, target, b"complete")
    assert open(target, "rb").read() == b"complete"

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(fs, target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert open(target, "rb").read() == b"complete"  # untouched
    assert sorted(os.listdir(tmp_path / "out")) == ["file.bin"]  # no temporary left behind


@pytest.mark.integration
def test_atomic_write_s3_uses_temp_key_then_copy(s3_bucket):
    fs, root = get_fs(f"s3://{s3_bucket}/p")
    target = safe_join(root, "doc.json")
    tmp_dir = safe_join(root, "_tmp")
    storage.atomic_write_json(fs, target, {"b": 1, "a": [1, 2]}, tmp_dir)
    assert storage.read_json(fs, target) == {"a": [1, 2], "b": 1}
    with pytest.raises(RuntimeError):
        with atomic_open(fs, safe_join(root, "never.bin"), tmp_dir) as f:
            f.write(b"x" * 100)
            raise RuntimeError("interrupted")
    fs.invalidate_cache()
    assert fs.find(root) == [target]  # neither the failed object nor any temporary key is visible
    assert storage.read_json(fs, safe_join(root, "missing.json")) is None


@pytest.mark.integration
def test_get_fs_takes_the_endpoint_from_the_aws_environment(s3_server, s3_bucket):
    fs, path = get_fs(f"s3://{s3_bucket}/x/")
    assert path == f"{s3_bucket}/x"
    assert fs.endpoint_url == s3_server["endpoint_url"]
    assert storage.full_url(fs, path) == f"s3://{s3_bucket}/x"
    assert s3_server["endpoint_url"] in storage.describe_endpoint(f"s3://{s3_bucket}/x")


def test_with_retries_retries_storage_errors_then_names_the_operation(caplog):
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("peer went away")

    with caplog.at_level(logging.WARNING, logger="pipelines.fsio"):
        with pytest.raises(
            StorageError, match=r"upload s3://b/k: storage still failing after 2 retries.*peer went away"
        ):
            with_retries(flaky, what="upload s3://b/k", retries=2, backoff=0.01)
    assert len(calls) == 3
    assert "retry 1/2" in caplog.text

    n = []

    def recovers():
        n.append(1)
        if len(n) < 2:
            raise TimeoutError("slow")
        return "ok"

    assert with_retries(recovers, what="x", retries=3, backoff=0.01) == "ok"


def test_with_retries_does_not_retry_data_or_missing_files():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, what="read", retries=3, backoff=0.01)
    assert len(calls) == 1
    assert not storage.is_storage_error(ValueError("bad json"))
    assert storage.is_storage_error(OSError(5, "I/O error"))


def test_hashing_writer_hashes_writes_in_order_and_surfaces_write_errors():
    import hashlib
    import io

    from pipelines.fsio import HashingWriter

    parts = [bytes([i]) * (i * 1000 + 1) for i in range(40)]
    for batch_bytes in (1 << 20, 5000, 0):  # one batch, a few parts per batch, every part on its own
        sink = io.BytesIO()
        with HashingWriter(sink, max_pending=2, batch_bytes=batch_bytes) as out:
            for p in parts:
                out.write(p)
        assert sink.getvalue() == b"".join(parts)
        assert out.hexdigest() == hashlib.sha256(b"".join(parts)).hexdigest() and out.size == len(
            sink.getvalue()
        )

    class FailingSink(io.BytesIO):
        def write(self, data):
            if self.tell() > 5000:
                raise OSError("disk full")
            return super().write(data)

    with pytest.raises(OSError, match="disk full"):
        with HashingWriter(FailingSink(), max_pending=2, batch_bytes=3000) as out:
            for p in parts:  # the error comes back on a later write or when the block ends
                out.write(p)
