"""For the search-service tests: a tiny model-backed store (real shards, real tiny checkpoint, embedded without
Ray), the service in a subprocess or a thread on 127.0.0.1, brute-force top-k over a snapshot's files, and a
small Chrome DevTools Protocol driver (headless Chromium over the `websockets` package) to use the page."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airport", "beach", "farmland", "forest"]


# ---------------------------------------------------------------------------------------------- the store


def embed_shards(store_url: str, checkpoint: Path, shards: Path, *, captions: bool = True, only=None) -> str:
    """Embed every committed shard under `shards` (or those whose path is in `only`) into `store_url` with the
    checkpoint, one unit per shard, one commit; what `ssjdn embed` stores, without Ray. Returns the model_id."""
    from pipelines.embed.sources import read_unit
    from pipelines.encoders import read_checkpoint, restore_encoders
    from pipelines.store.reader import EmbeddingStore
    from pipelines.store.schema import META_COLUMNS, build_table
    from pipelines.store.writer import VersionWriter
    from ssjdn.data.images import decode_image

    blob = read_checkpoint(str(checkpoint))
    enc = restore_encoders(blob)
    tf = enc.transform()
    writer = VersionWriter(EmbeddingStore(store_url), blob.model_id, enc.model_info(blob, "float32"))
    manifest = json.loads((shards / "_manifest.json").read_text())
    for s in manifest["shards"]:
        if only is not None and s["path"] not in only:
            continue
        unit = {
            "id": s["path"],
            "kind": "shard",
            "url": str(shards / s["path"]),
            "split": s["split"],
            "fingerprint": s["sha256"],
            "bad": [],
        }
        samples = list(read_unit(unit))
        emb = enc.encode_pixels(np.stack([tf.array(decode_image(x["image"], x["name"])) for x in samples]))
        cols = {c: [x[c] for x in samples] for c in META_COLUMNS}
        tables = {"images": build_table("images", cols, emb, dim=enc.dim, model_id=blob.model_id)}
        if captions:
            caps = [(x, i, c) for x in samples for i, c in enumerate(x["captions"])]
            ccols = {c: [x[c] for x, _, _ in caps] for c in META_COLUMNS}
            ccols["key"] = [f"{x['key']}__cap{i}" for x, i, _ in caps]
            ccols.update(
                image_key=[x["key"] for x, _, _ in caps],
                caption_index=[i for _, i, _ in caps],
                caption=[c for _, _, c in caps],
            )
            cemb = enc.encode_texts([c for _, _, c in caps])
            tables["captions"] = build_table("captions", ccols, cemb, dim=enc.dim, model_id=blob.model_id)
        writer.stage(unit, tables)
    writer.commit()
    writer.close()
    return blob.model_id


def build_model_store(root: Path, *, n_per_class: int = 4, maxcount: int = 6) -> dict:
    """Synthetic dataset -> shards -> tiny checkpoint -> store (images + captions). 16 images by default."""
    from pipelines.shard.job import shard_dataset
    from ssjdn.data.synthetic import generate_synthetic
    from tests.embed_helpers import dataset_captions, make_tiny_checkpoint

    root = Path(root)
    data = generate_synthetic(root / "data", n_per_class=n_per_class, size=48, seed=2, classes=CLASSES)
    ckpt = make_tiny_checkpoint(root / "tiny.pt", dataset_captions(data))
    shards = root / "shards"
    shard_dataset(data, str(shards), maxcount=maxcount, progress=False)
    store = root / "store"
    model_id = embed_shards(str(store), ckpt, shards)
    doc = json.loads((data / "dataset.json").read_text())
    return {
        "root": root,
        "data": data,
        "ckpt": ckpt,
        "shards": shards,
        "store": str(store),
        "model_id": model_id,
        "images": sorted((data / "images").iterdir()),
        "dataset": doc,
    }


_SHARED: dict[str, dict] = {}


def shared_model_store() -> dict:
    """One `build_model_store` per test process (the modules that only read it share it; a test that writes
    into a store copies it first with `copy_store`)."""
    if "store" not in _SHARED:
        import atexit
        import shutil

        root = Path(tempfile.mkdtemp(prefix="ssjdn-serve-store-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED["store"] = build_model_store(root)
    return _SHARED["store"]


def copy_store(info: dict, dest: Path) -> dict:
    """A writable copy of a built store (the shards it points at stay shared, read-only)."""
    import shutil

    shutil.copytree(info["store"], dest)
    return {**info, "store": str(dest)}


def snapshot_arrays(store_url: str, table: str = "images") -> tuple[list[str], np.ndarray]:
    """(keys, [N, D] embeddings) of the current snapshot's committed files, read with plain pyarrow in the
    snapshot's file order (the brute-force reference)."""
    import pyarrow.parquet as pq

    from pipelines.store.reader import EmbeddingStore
    from pipelines.store.schema import embeddings_to_numpy

    snap = EmbeddingStore(store_url).snapshot()
    keys, vecs = [], []
    for path in snap.paths(table):
        t = pq.read_table(path, columns=["key", "embedding"])
        keys += t.column("key").to_pylist()
        vecs.append(embeddings_to_numpy(t.column("embedding")))
    return keys, np.concatenate(vecs)


def brute_force(keys: list[str], vecs: np.ndarray, q: np.ndarray, k: int, mask=None):
    """(keys, scores) of the top k by cosine, ties by row: numpy over everything."""
    q = np.asarray(q, np.float64)
    q = q / np.linalg.norm(q)
    scores = vecs.astype(np.float64) @ q
    idx = np.arange(len(keys)) if mask is None else np.flatnonzero(mask)
    order = idx[np.lexsort((idx, -scores[idx]))][:k]
    return [keys[i] for i in order], scores[order]


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of width x height: ~50 KB on disk, 400M pixels when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- servers


class ServerProcess:
    """`python -m pipelines.serve ... --port 0` in a subprocess; its log lines collected; stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.args = [sys.executable, "-m", "pipelines.serve", *args, "--port", "0"]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
        self.lines: list[str] = []
        self.url = ""

    def start(self, timeout_s: float = 240) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.args, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
                if m:
                    self.url = m.group(1)
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError("the service exited at start-up:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.1)
        self.proc.kill()
        raise TimeoutError("the service did not start:\n" + "\n".join(self.lines[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(0.2)  # the reader thread drains the last lines
        return self.proc.returncode


class ThreadServer:
    """A FastAPI app on 127.0.0.1 (free port) under uvicorn in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# ---------------------------------------------------------------------------------------------- a browser


class Chrome:
    """Headless Chromium driven over the DevTools protocol (one browser websocket, flattened page sessions)."""

    def __init__(self) -> None:
        from websockets.sync.client import connect

        from tests.browser import HEADLESS_FLAGS, chromium_binary

        self.profile = tempfile.TemporaryDirectory(prefix="ssjdn-chrome-")
        self.proc = subprocess.Popen(
            [
                chromium_binary(),
                *HEADLESS_FLAGS,
                "--disable-extensions",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile.name}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(
                    f"chromium did not start: {self.proc.stderr.read()[-2000:] if self.proc.poll() is not None else 'timeout'}"
                )
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def call(
        self, method: str, params: dict | None = None, session: str | None = None, timeout_s: float = 60
    ):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def page(self) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout_s=10)
        except Exception:
            pass
        self.ws.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.profile.cleanup()


class Page:
    def __init__(self, chrome: Chrome, session: str) -> None:
        self.chrome, self.session = chrome, session
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method: str, params: dict | None = None, timeout_s: float = 60):
        return self.chrome.call(method, params, self.session, timeout_s)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def eval(self, expression: str):
        r = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60):
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s}s for {expression}")
            time.sleep(0.05)

    def type(self, selector: str, text: str, clear: bool = True) -> None:
        """Focus the element and type `text` into it (as keyboard input: input events fire)."""
        reset = "e.value = '';" if clear else ""
        self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); {reset} }})()"
        )
        self.call("Input.insertText", {"text": text})

    def key(self, key: str, code: str, vk: int, text: str | None = None) -> None:
        down = {
            "type": "keyDown",
            "key": key,
            "code": code,
            "windowsVirtualKeyCode": vk,
            "nativeVirtualKeyCode": vk,
        }
        if text:
            down["text"] = text
        self.call("Input.dispatchKeyEvent", down)
        self.call("Input.dispatchKeyEvent", {**down, "type": "keyUp", "text": ""})

    def enter(self) -> None:
        self.key("Enter", "Enter", 13, "\r")

    def set_files(self, selector: str, paths: list[str]) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.call("DOM.setFileInputFiles", {"files": paths, "nodeId": node})

    def loaded_images(self, selector: str = ".hit img") -> tuple[int, int]:
        return tuple(
            self.eval(
                f"(() => {{ const i = Array.from(document.querySelectorAll({json.dumps(selector)}));"
                " return [i.length, i.filter(x => x.complete && x.naturalWidth > 0).length]; })()"
            )
        )
