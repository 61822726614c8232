"""Headless Chromium for tests that look at pages the project writes (Debian `chromium`, installed when missing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Counts loaded and broken images once the page has loaded, and writes the result into the DOM.
_IMAGE_CHECK = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const el = document.createElement('pre');
  el.id = 'ssjdn-image-check';
  el.textContent = 'IMAGES total=' + imgs.length + ' loaded=' + ok + ' END';
  document.body.appendChild(el);
});
</script>
"""


def chromium_binary() -> str:
    """Path of a Chromium binary; installs Debian's `chromium` when missing and we are root (CI, dev machines)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and we are not root to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True)
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


# Headless and offline: no GPU, no first-run pages, no background requests of Chromium's own.
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def run_page_check(html_path: Path, check_script: str, marker: str, extra_flags=()) -> re.Match:
    """Open `html_path` with `check_script` added to its body in headless Chromium and return the match of
    `marker` (a regex) in the rendered DOM. The page is copied beside the original, so relative paths resolve
    the same way."""
    html_path = Path(html_path).resolve()
    page = html_path.read_text()
    page = page.replace("</body>", check_script + "</body>") if "</body>" in page else page + check_script
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=html_path.parent, delete=False) as f:
        f.write(page)
        probe = Path(f.name)
    try:
        with tempfile.TemporaryDirectory() as profile:
            out = subprocess.run(
                [
                    chromium_binary(),
                    *HEADLESS_FLAGS,
                    *extra_flags,
                    f"--user-data-dir={profile}",
                    "--virtual-time-budget=10000",
                    "--dump-dom",
                    probe.as_uri(),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
    finally:
        probe.unlink(missing_ok=True)
    match = re.search(marker, out.stdout)
    assert match, f"chromium did not render the page: rc={out.returncode} stderr={out.stderr[-2000:]}"
    return match


def count_loaded_images(html_path: Path) -> tuple[int, int]:
    """Open `html_path` in headless Chromium and return (images on the page, images that loaded)."""
    match = run_page_check(
        html_path,
        _IMAGE_CHECK,
        r"IMAGES total=(\d+) loaded=(\d+) END",
        extra_flags=("--disable-quic", "--allow-file-access-from-files"),
    )
    return int(match.group(1)), int(match.group(2))
