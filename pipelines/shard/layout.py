"""The shard destination's layout and tar format: every name a reader or writer of shards needs, defined once.

DEST/{split}/shard-000000.tar        committed shards (written under _tmp/, then renamed / copied)
DEST/_stats/{split}/shard-000000.json per-shard record: plan digest, sha256, bytes, key range, bad samples
DEST/_stats/run.json                  which dataset and options this destination is being written with
DEST/_quarantine/report.jsonl         bad samples: key, source, reason
DEST/_manifest.json                   the commit point, written last and atomically
"""

from __future__ import annotations

import re

FORMAT = "ssjdn-webdataset-shards/1"
MANIFEST = "_manifest.json"
STATS = "_stats"
TMP = "_tmp"
QUARANTINE = "_quarantine/report.jsonl"
RUN_RECORD = f"{STATS}/run.json"
SPLIT_ORDER = ("train", "val", "test")
SHARD_NAME = "shard-{:06d}.tar"
SHARD_FILE_RE = re.compile(r"^shard-\d{6}\.tar$")

# Fixed tar header fields: with these the bytes of a shard depend only on its samples.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_OWNER = "ssjdn"
TAR_MODE = 0o444

# PIL format -> member extension. The extension names the real encoding, whatever the file was called.
EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
REENCODE = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 95})}
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tar pads the archive to whole records (as tarfile and GNU tar do)

# Members a shard sample may hold; readers decode these and nothing else (never webdataset's default decoder).
IMAGE_EXTS = ("jpg", "jpeg", "png", "tif", "tiff", "webp", "gif", "bmp")
EXPECTED_MEMBERS = frozenset((*IMAGE_EXTS, "json", "cls", "txt"))


# A reference to one member of a shard, as the embedding store records an image's source.
def member_uri(shard_url: str, member: str) -> str:
    """fsspec URL of one tar member (`tar://KEY.jpg::s3://bucket/test/shard-000000.tar`): `fsspec.open` reads it."""
    return f"tar://{member}::{shard_url}"


def split_member_uri(uri: str) -> tuple[str, str] | None:
    """(shard URL, member) for a `member_uri`, else None."""
    if not uri.startswith("tar://") or "::" not in uri:
        return None
    member, shard = uri[len("tar://") :].split("::", 1)
    return shard, member
