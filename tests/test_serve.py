"""`ssjdn serve` over HTTP on 127.0.0.1: results equal brute force over the snapshot's files (exact; ANN recall
reported), metadata and thumbnails from the shards, every error case as one-line JSON with its status code,
the token, a re-index committed while queries run, structured access logs and a graceful shutdown."""

from __future__ import annotations

import json
import tarfile
import threading
import time
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter
from tests.serve_support import (
    ServerProcess,
    ThreadServer,
    bomb_png,
    brute_force,
    copy_store,
    shared_model_store,
    snapshot_arrays,
)

TOKEN = "s3cr3t-t0ken-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def store():
    return shared_model_store()


@pytest.fixture(scope="module")
def server(store):
    srv = ServerProcess(
        ["--store", store["store"], "--cache-dir", str(store["root"] / "serve-cache"), "--ann"]
    )
    srv.start()
    yield srv
    # Graceful shutdown on SIGTERM: open requests finish, the batcher drains, the process ends on its own.
    rc = srv.stop()
    assert rc in (0, -15), "\n".join(srv.lines[-30:])
    assert any("search service stopped" in line for line in srv.lines)
    assert any("Application shutdown complete" in line for line in srv.lines)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        deadline = time.monotonic() + 120  # the ANN index of the tiny store builds in the background
        while c.get("/health").json()["tables"]["images"]["ann"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.2)
        yield c


def assert_error(r: httpx.Response, status: int, contains: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "status"} and body["status"] == status, body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert contains.lower() in body["error"].lower(), body


def test_health_page_and_offline_openapi(client, store):
    h = client.get("/health").json()
    assert (h["status"], h["model_id"], h["generation"], h["auth_required"]) == (
        "ok",
        store["model_id"],
        1,
        False,
    )
    assert h["tables"]["images"]["rows"] == 16
    spec = client.get("/openapi.json").json()
    assert {"/search", "/search/image", "/items/{key}", "/thumbnails/{key}", "/health"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404  # CDN pages
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    for asset in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(asset).text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, (
            asset
        )
    assert_error(client.get("/static/../../pyproject.toml"), 404)
    assert_error(client.get("/static/index.html.bak"), 404, "no such asset")


def test_exact_results_equal_brute_force_over_the_snapshot(client, store):
    keys, vecs = snapshot_arrays(store["store"])
    classes = {k: c for k, c in zip(*_column(store["store"], "class"))}
    rng = np.random.default_rng(11)
    for _ in range(5):
        q = rng.standard_normal(vecs.shape[1]).astype(np.float32)
        r = client.post("/search", json={"vector": q.tolist(), "k": 7}).json()
        want, scores = brute_force(keys, vecs, q, 7)
        assert r["mode"] == "exact" and [h["key"] for h in r["hits"]] == want
        np.testing.assert_allclose([h["score"] for h in r["hits"]], scores, atol=1e-6, rtol=0)
        r = client.post("/search", json={"vector": q.tolist(), "k": 3, "where": "class = 'beach'"}).json()
        mask = np.array([classes[k] == "beach" for k in keys])
        assert [h["key"] for h in r["hits"]] == brute_force(keys, vecs, q, 3, mask)[0]


def test_text_results_equal_the_model_and_brute_force(client, store):
    from pipelines.encoders import read_checkpoint, restore_encoders

    enc = restore_encoders(read_checkpoint(str(store["ckpt"])))
    keys, vecs = snapshot_arrays(store["store"])
    for text in ("a beach with blue sea", "many planes parked"):
        q = enc.encode_texts([text])[0]
        want, scores = brute_force(keys, vecs, q, 5)
        for r in (
            client.get("/search", params={"text": text, "k": 5}),
            client.post("/search", json={"text": text, "k": 5}),
        ):
            body = r.json()
            assert [h["key"] for h in body["hits"]] == want and body["query"] == text
            np.testing.assert_allclose([h["score"] for h in body["hits"]], scores, atol=1e-6, rtol=0)
    caps = client.get(
        "/search", params={"text": "a beach", "k": 4, "table": "captions", "where": "caption_index = 0"}
    ).json()
    assert caps["table"] == "captions" and all(h["caption_index"] == 0 and h["caption"] for h in caps["hits"])


def test_ann_results_and_their_recall(client, store):
    keys, vecs = snapshot_arrays(store["store"])
    rng = np.random.default_rng(12)
    recalls = []
    for _ in range(10):
        q = rng.standard_normal(vecs.shape[1]).astype(np.float32)
        r = client.post("/search", json={"vector": q.tolist(), "k": 5, "mode": "ann"}).json()
        assert r["mode"] == "ann" and r["ann"]["recall@10"] is not None
        recalls.append(len({h["key"] for h in r["hits"]} & set(brute_force(keys, vecs, q, 5)[0])) / 5)
    print(f"ANN recall@5 vs brute force over HTTP: {np.mean(recalls):.3f}; at build: {r['ann']['recall@10']}")
    assert np.mean(recalls) >= 0.9


def test_image_upload_finds_the_image_itself(client, store):
    image = store["images"][3]
    r = client.post(
        "/search/image", files={"file": (image.name, image.read_bytes(), "image/jpeg")}, data={"k": "3"}
    )
    body = r.json()
    assert r.status_code == 200 and body["hits"][0]["key"] == f"synthetic__{image.stem}"
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5) and len(body["hits"]) == 3


def test_items_and_thumbnails_come_from_the_shards(client, store):
    hit = client.get("/search", params={"text": "a forest", "k": 1}).json()["hits"][0]
    item = client.get(hit["item"]).json()
    name = f"{hit['key'].split('__', 1)[1]}.jpg"
    want_caps = next(
        [s["raw"] for s in im["sentences"]] for im in store["dataset"]["images"] if im["filename"] == name
    )
    assert item["key"] == hit["key"] and item["captions"] == want_caps and item["class"] == hit["class"]
    assert item["source"].startswith("tar://") and "dataset" in item
    thumb = client.get(hit["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    shard, member = (
        item["source"][len("tar://") :].split("::")[1],
        item["source"][len("tar://") :].split("::")[0],
    )
    with tarfile.open(shard) as tar:
        assert thumb.content == tar.extractfile(member).read()


def _column(url: str, column: str):
    import pyarrow.parquet as pq

    snap = EmbeddingStore(url).snapshot()
    keys, values = [], []
    for p in snap.paths("images"):
        t = pq.read_table(p, columns=["key", column])
        keys += t.column("key").to_pylist()
        values += t.column(column).to_pylist()
    return keys, values


ERRORS = [
    (
        "bad filter",
        "get",
        "/search",
        {"params": {"text": "a", "where": "colour = 'red'"}},
        422,
        "unknown column 'colour'",
    ),
    (
        "filter syntax",
        "get",
        "/search",
        {"params": {"text": "a", "where": "class = 'a'; DROP TABLE x"}},
        422,
        "unexpected character",
    ),
    ("k=0", "get", "/search", {"params": {"text": "a", "k": 0}}, 422, "k must be between 1 and 1000"),
    ("k=10^9", "get", "/search", {"params": {"text": "a", "k": 10**9}}, 422, "k must be between 1 and 1000"),
    ("k not a number", "get", "/search", {"params": {"text": "a", "k": "ten"}}, 422, "k:"),
    ("empty text", "get", "/search", {"params": {"text": "", "k": 3}}, 422, "text is empty"),
    ("blank text", "post", "/search", {"json": {"text": "   "}}, 422, "text is empty"),
    ("no text", "get", "/search", {"params": {"k": 3}}, 422, "text: field required"),
    ("1 MB text", "post", "/search", {"json": {"text": "x" * (1 << 20)}}, 413, "over the limit"),
    (
        "long text",
        "post",
        "/search",
        {"json": {"text": "x" * 5000}},
        422,
        "5000 characters; the limit is 1000",
    ),
    (
        "text and vector",
        "post",
        "/search",
        {"json": {"text": "a", "vector": [1.0]}},
        422,
        "exactly one of text or vector",
    ),
    ("vector of another size", "post", "/search", {"json": {"vector": [1.0, 2.0]}}, 422, "has 2 values"),
    ("unknown field", "post", "/search", {"json": {"text": "a", "limit": 5}}, 422, "limit: extra inputs"),
    (
        "geo filter on a version without footprints",
        "post",
        "/search",
        {"json": {"text": "a", "bbox": [0, 0, 1, 1]}},
        422,
        "no footprints",
    ),
    (
        "chunked body too big",
        "post",
        "/search",
        {"content": iter([b"x" * 40000] * 3), "headers": {"content-type": "application/json"}},
        413,
        "over the limit",
    ),
    (
        "not JSON",
        "post",
        "/search",
        {"content": b"{oops", "headers": {"content-type": "application/json"}},
        422,
        "",
    ),
    (
        "non-image upload",
        "post",
        "/search/image",
        {"files": {"file": ("a.jpg", b"GIF? no, just text")}},
        422,
        "not a recognised image",
    ),
    (
        "20000x20000 PNG",
        "post",
        "/search/image",
        {"files": {"file": ("bomb.png", bomb_png())}},
        413,
        "over the limit of 40000000 pixels",
    ),
    (
        "upload too big",
        "post",
        "/search/image",
        {"files": {"file": ("big.jpg", b"\xff" * (11 << 20))}},
        413,
        "over the limit",
    ),
    ("no file", "post", "/search/image", {"data": {"k": "3"}}, 422, "file: field required"),
    ("unknown key", "get", "/items/synthetic__nope_0000", {}, 404, "no image with key"),
    ("unknown thumbnail", "get", "/thumbnails/synthetic__nope_0000", {}, 404, "no image with key"),
    ("traversal key", "get", "/thumbnails/" + quote("../../etc/passwd", safe=""), {}, 404, ""),
    ("traversal item", "get", "/items/" + quote("../../etc/passwd", safe=""), {}, 404, ""),
    ("dot-dot key", "get", "/thumbnails/%2E%2E", {}, 404, ""),
    (
        "backslash traversal",
        "get",
        "/thumbnails/" + quote("..\\..\\etc\\passwd", safe=""),
        {},
        404,
        "no image with key",
    ),
    ("absolute path key", "get", "/thumbnails/" + quote("/etc/passwd", safe=""), {}, 404, ""),
    ("very long key", "get", "/items/" + "a" * 5000, {}, 404, "no such key"),
    ("wrong method", "delete", "/search", {}, 405, "method not allowed"),
    ("unknown route", "get", "/admin", {}, 404, "not found"),
]


@pytest.mark.parametrize("name, method, path, kwargs, status, contains", ERRORS, ids=[e[0] for e in ERRORS])
def test_error_cases_answer_one_line_json(client, name, method, path, kwargs, status, contains):
    assert_error(getattr(client, method)(path, **kwargs), status, contains)


def test_access_log_is_structured_and_leaves_queries_out(client, server):
    client.get("/search", params={"text": "private words of an analyst", "k": 2})
    time.sleep(0.3)
    records = [
        json.loads(line.split("ssjdn.serve.access: ", 1)[1])
        for line in server.lines
        if "ssjdn.serve.access: " in line
    ]
    assert records and {"ts", "id", "client", "method", "path", "status", "bytes", "ms"} <= set(records[-1])
    assert any(r["path"] == "/search" and r["status"] == 200 for r in records)
    assert not any("private words" in line for line in server.lines)


# ---------------------------------------------------------------------------------------------- in-process servers


def _app(store_url: str, tmp_path, token: str | None = None, **searcher_kw):
    from pipelines.search.searcher import Searcher
    from pipelines.serve.app import create_app
    from pipelines.serve.options import ServeOptions

    searcher = Searcher(store_url, read_only=True, cache_dir=tmp_path / "cache", **searcher_kw)
    return searcher, create_app(searcher, ServeOptions(), token=token)


def test_a_token_is_required_when_configured(store, tmp_path, caplog):
    caplog.set_level("INFO", logger="ssjdn.serve.access")
    searcher, app = _app(store["store"], tmp_path, token=TOKEN, load_encoders=False)
    vector = np.ones(searcher.dim).tolist()
    with ThreadServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/health").json()["auth_required"] is True  # probes need no token
        assert c.get("/").status_code == 200  # nor does the page (it asks for the token)
        missing = c.post("/search", json={"vector": vector})
        assert_error(missing, 401, "bearer token")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error(
            c.post("/search", json={"vector": vector}, headers={"Authorization": "Bearer nope"}), 401
        )
        assert_error(c.get("/thumbnails/synthetic__beach_0000"), 401)
        assert_error(c.get("/items/synthetic__beach_0000", headers={"Authorization": TOKEN}), 401)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        hits = c.post("/search", json={"vector": vector, "k": 2}, headers=auth).json()["hits"]
        assert len(hits) == 2
        assert c.get(hits[0]["thumbnail"], headers=auth).status_code == 200
        assert c.get(hits[0]["item"], headers=auth).json()["key"] == hits[0]["key"]
    searcher.close()
    assert caplog.records and not any(TOKEN in r.getMessage() for r in caplog.records)


def test_a_reindex_while_queries_run_switches_without_a_failed_query(store, tmp_path):
    info = copy_store(store, tmp_path / "store")
    searcher, app = _app(info["store"], tmp_path, load_encoders=False, refresh_s=0.1)
    searcher.watch()
    snap = EmbeddingStore(info["store"]).snapshot()
    old = snap.take("images", list(range(4)), ["key", "source", "split", "class", "lat", "lon"]).to_pylist()
    new_vecs = np.random.default_rng(4).standard_normal((4, searcher.dim)).astype(np.float32)
    new_vecs /= np.linalg.norm(new_vecs, axis=1, keepdims=True)
    outcomes: list[tuple[int, int, str]] = []
    stop = threading.Event()
    with ThreadServer(app) as srv:

        def hammer() -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/search", json={"vector": new_vecs[0].tolist(), "k": 3})
                    body = r.json()
                    outcomes.append(
                        (
                            r.status_code,
                            body.get("generation", -1),
                            (body.get("hits") or [{}])[0].get("key", ""),
                        )
                    )

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        while len(outcomes) < 10:
            time.sleep(0.02)
        # The nightly re-index: a new unit (rows re-using existing images) committed while queries run.
        writer = VersionWriter(EmbeddingStore(info["store"]), info["model_id"], snap.model)
        cols = {c: [r[c] for r in old] for c in old[0]}
        cols["key"] = [f"reindexed__{i}" for i in range(4)]
        writer.stage(
            {"id": "nightly/shard-900000.tar", "bad": []},
            {"images": build_table("images", cols, new_vecs, dim=searcher.dim, model_id=info["model_id"])},
        )
        writer.commit()
        writer.close()
        deadline = time.monotonic() + 60
        while not any(g == 2 for _, g, _ in outcomes) and time.monotonic() < deadline:
            time.sleep(0.05)
        n = len(outcomes)
        while len(outcomes) < n + 10:
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join()
        with httpx.Client(base_url=srv.url) as c:
            after = c.get("/thumbnails/reindexed__0")
            assert after.status_code == 200 and after.headers["content-type"] == "image/jpeg"
    searcher.close()
    statuses = {s for s, _, _ in outcomes}
    generations = [g for _, g, _ in outcomes]
    assert statuses == {200}, f"{len(outcomes)} queries: {sorted(statuses)}"
    assert generations[0] == 1 and generations[-1] == 2
    assert all(
        key == "reindexed__0" for _, g, key in outcomes if g == 2
    )  # the new rows, from the next query on
    print(
        f"{len(outcomes)} queries across the commit: {generations.count(1)} on generation 1, {generations.count(2)} on 2"
    )


def test_cli_refuses_a_public_address_without_a_token(tmp_path, capsys):
    from ssjdn_cli.main import main

    assert main(["serve", "--store", str(tmp_path / "nothing"), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "ssjdn serve: error: --host 0.0.0.0 is reachable from other machines: give --token-file"
    )
    assert "\n" not in err
    short = tmp_path / "token"
    short.write_text("abc\n")
    assert (
        main(["serve", "--store", str(tmp_path / "nothing"), "--host", "0.0.0.0", "--token-file", str(short)])
        == 1
    )
    assert "at least 16 characters" in capsys.readouterr().err


def test_the_kubernetes_manifest_and_the_image_run_a_valid_serve_command():
    import argparse
    import re
    from pathlib import Path

    import yaml

    from pipelines.options import from_args
    from pipelines.serve import cli
    from pipelines.serve.options import ServeOptions
    from pipelines.serve.server import check_bind

    repo = Path(__file__).resolve().parents[1]
    docs = {d["kind"]: d for d in yaml.safe_load_all((repo / "infra/serve/deployment.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    options = from_args(ServeOptions, parser.parse_args(container["args"]))
    assert options.host == "0.0.0.0" and options.token_file.startswith("/var/run/ssjdn/")
    check_bind(options, token="t" * 16)  # a public bind with a token is accepted
    assert container["ports"] == [{"name": "http", "containerPort": options.port}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert options.cache_dir in mounts and "/tmp" in mounts
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] == "http"
    dockerfile = (repo / "infra/serve/Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["ssjdn", "serve"\]$', dockerfile, re.M)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    for pkg in (p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]):
        assert re.search(rf"^COPY {pkg} \./{pkg}$", dockerfile, re.M), pkg
    assert pyproject["tool"]["setuptools"]["package-data"]["pipelines.serve"] == ["static/*"]
