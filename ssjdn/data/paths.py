"""Where a dataset's images may come from: the dataset root, the image root and the folders a user allows.

Two checks, both about the *local* filesystem (remote URLs listed in a table - `s3://`, `gs://`, `https://` -
are the user's to choose and stay allowed):
- names and URLs: `local_url_path` says which local file a URL reads (`file:`, `local:`, a chain ending in one,
  normalised by fsspec); readers accept an absolute path, a `..` name or such a URL only when it lands inside
  an allowed root (`under`);
- symbolic links: `SymlinkGuard` refuses an image whose real path (links resolved) lies outside every allowed
  root, unless links are followed on purpose (`--follow-symlinks`). It looks at the file system only: no byte
  of the file is read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from functools import lru_cache


def allowed_roots(*roots: str | os.PathLike | None) -> tuple[str, ...]:
    """Absolute, normalised, de-duplicated roots (None entries dropped), in order."""
    out: list[str] = []
    for r in roots:
        if r is None:
            continue
        p = os.path.normpath(os.path.abspath(os.fspath(r)))
        if p not in out:
            out.append(p)
    return tuple(out)


def under(path: str, roots: Iterable[str]) -> bool:
    """Whether the normalised absolute `path` lies strictly inside one of `roots` (compared as written)."""
    for root in roots:
        prefix = root if root.endswith(os.sep) else root + os.sep
        if path.startswith(prefix) and len(path) > len(prefix):
            return True
    return False


@lru_cache(maxsize=256)
def _is_local_protocol(protocol: str) -> bool:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    try:
        return issubclass(fsspec.get_filesystem_class(protocol), LocalFileSystem)
    except (ValueError, ImportError):  # unknown or not installed: fsspec cannot read it from here at all
        return False


def local_url_path(url: str) -> str | None:
    """The local file a URL reads (normalised: absolute, no `.`/`..`), or None for a remote URL.

    `file:///x`, `local:///x`, chains whose last link is local (`simplecache::file:///x`, `tar://m::/x.tar`
    read `/x`, `/x.tar`); protocols are matched case-insensitively, so `FILE:///x` counts as well.
    """
    from fsspec.utils import get_protocol

    last = url.split("::")[-1]
    protocol = get_protocol(last).lower()
    if not _is_local_protocol(protocol):
        return None
    from fsspec.implementations.local import LocalFileSystem

    if "://" in last and not last.startswith(f"{protocol}://"):
        last = protocol + last[len(protocol) :]  # `FILE://x` -> `file://x` for fsspec's parser
    return os.path.normpath(LocalFileSystem._strip_protocol(last))


class SymlinkGuard:
    """Refuses local image files whose real path lies outside `roots` (links resolved), unless `follow`.

    The roots are resolved once (a dataset folder that is itself a link is fine); each image's folder is resolved
    once per folder, and the file itself is `lstat`ed: one system call per image in the common case.
    """

    def __init__(self, roots: Iterable[str | os.PathLike], *, follow: bool = False) -> None:
        self.follow = follow
        self.roots = tuple(os.path.realpath(r) for r in roots)
        self._folders: dict[str, str] = {}

    def check(self, source: str) -> str | None:
        """None when `source` may be read; else the reason (naming the link and where it leads)."""
        # Not an absolute path: a URL, remote (readers turned the local ones into paths).
        if self.follow or not source.startswith(os.sep):
            return None
        folder, name = os.path.split(source)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.realpath(folder)
        target = os.path.join(real_folder, name)
        try:
            if stat.S_ISLNK(os.lstat(target).st_mode):
                target = os.path.realpath(target)
        except OSError:
            return None  # missing: the caller reports it as missing
        if under(target, self.roots):
            return None
        return (
            f"symbolic link out of the dataset root: {source} resolves to {target}, outside "
            f"{', '.join(self.roots)} (pass --follow-symlinks to read it, or --allow-root DIR)"
        )
