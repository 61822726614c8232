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


def count_loaded_images(html_path: Path) -> tuple[int, int]:
    """Open `html_path` in headless Chromium and return (images on the page, images that loaded)."""
    html_path = Path(html_path).resolve()
    page = html_path.read_text()
    page = page.replace("</body>", _IMAGE_CHECK + "</body>") if "</body>" in page else page + _IMAGE_CHECK
    # The copy sits beside the original so relative image paths resolve the same way.
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=html_path.parent, delete=False) as f:
        f.write(page)
        probe = Path(f.name)
    try:
        with tempfile.TemporaryDirectory() as profile:
            out = subprocess.run(
                [
                    chromium_binary(),
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    "--allow-file-access-from-files",
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
    match = re.search(r"IMAGES total=(\d+) loaded=(\d+) END", out.stdout)
    assert match, f"chromium did not render the page: rc={out.returncode} stderr={out.stderr[-2000:]}"
    return int(match.group(1)), int(match.group(2))
