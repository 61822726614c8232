"""The search page in real headless Chromium (DevTools protocol): type a query and see k thumbnails load, use it
from the keyboard, upload an image, see a bad filter's error, a token-protected server, the footprint view."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter
from tests.serve_support import Chrome, ServerProcess, ThreadServer, copy_store, shared_model_store

TOKEN = "page-token-0123456789abcdef"
FOOTPRINT_QUERY = "three chips with footprints"


@pytest.fixture(scope="module")
def store():
    return shared_model_store()


@pytest.fixture(scope="module")
def server(store):
    srv = ServerProcess(["--store", store["store"], "--cache-dir", str(store["root"] / "browser-cache")])
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chrome():
    browser = Chrome()
    yield browser
    browser.close()


@pytest.fixture
def page(chrome, server):
    p = chrome.page()
    p.goto(server.url + "/")
    p.wait_for("document.getElementById('status').textContent.includes('generation 1')")
    return p


def wait_results(page, k: int) -> None:
    page.wait_for(f"document.querySelectorAll('.hit').length === {k}")
    page.wait_for(
        f"(() => {{ const i = Array.from(document.querySelectorAll('.hit img'));"
        f" return i.length === {k} && i.every(x => x.complete && x.naturalWidth > 0); }})()"
    )


def test_type_a_query_submit_and_see_k_thumbnails(page):
    page.type("#k", "6")
    page.type("#q", "a beach with blue sea")
    page.enter()
    wait_results(page, 6)
    assert page.loaded_images() == (6, 6)
    page.wait_for(
        "Array.from(document.querySelectorAll('.hit .caption')).every(c => c.textContent.length > 0)"
    )
    summary = page.eval("document.getElementById('summary').textContent")
    assert summary.startswith("6 results · exact · generation 1")
    assert page.eval("document.getElementById('error').hidden") is True
    visible = "(id) => getComputedStyle(document.getElementById(id)).display !== 'none'"
    assert page.eval(f"[{visible}][0]('token-box')") is False  # no token asked for by an open server
    assert page.eval(f"[{visible}][0]('footprints')") is False  # no footprints in this store


def test_the_page_works_from_the_keyboard(page):
    page.type("#q", "a forest")
    page.enter()
    wait_results(page, 12)
    page.eval("document.activeElement.blur()")
    page.key("/", "Slash", 191, "/")
    assert page.eval("document.activeElement.id") == "q"
    page.eval("document.querySelector('.hit').focus()")
    page.key("ArrowRight", "ArrowRight", 39)
    assert page.eval("document.activeElement.dataset.index") == "1"
    page.enter()
    page.wait_for("document.getElementById('detail').open")
    assert page.eval("document.getElementById('detail-title').textContent").startswith("#2 · ")
    page.key("Escape", "Escape", 27)
    page.wait_for("!document.getElementById('detail').open")


def test_upload_an_image(page, store):
    image = store["images"][5]
    page.type("#k", "4")
    page.set_files("#image", [str(image)])
    wait_results(page, 4)
    assert page.eval("document.querySelector('.hit').dataset.key") == f"synthetic__{image.stem}"


def test_an_invalid_filter_shows_the_error(page):
    page.type("#q", "a beach")
    page.type("#where", "colour = 'red'")
    page.enter()
    text = page.wait_for(
        "(() => { const e = document.getElementById('error'); return !e.hidden && e.textContent; })()"
    )
    assert text.startswith("where: unknown column 'colour'")
    assert page.eval("document.querySelectorAll('.hit').length") == 0
    page.type("#where", "class = 'beach'")  # fixed: the error goes, results come
    page.enter()
    wait_results(page, 4)  # the four beaches
    assert page.eval("document.getElementById('error').hidden") is True


# ---------------------------------------------------------------------------------------------- token + footprints


@pytest.fixture(scope="module")
def geo_server(store, tmp_path_factory):
    """A token-protected server over a copy of the store plus three rows whose shard json carries footprints."""
    from pipelines.search.searcher import Searcher
    from pipelines.serve.app import create_app
    from pipelines.serve.options import ServeOptions

    root = tmp_path_factory.mktemp("geo")
    info = copy_store(store, root / "store")
    snap = EmbeddingStore(info["store"]).snapshot()
    tar_path = root / "chips.tar"
    image = store["images"][0].read_bytes()
    keys = [f"chips__c{i}" for i in range(3)]
    with tarfile.open(tar_path, "w") as tar:
        for i, key in enumerate(keys):
            ring = [[10 + i, 50], [10.8 + i, 50], [10.8 + i, 50.5], [10 + i, 50.5], [10 + i, 50]]
            doc = {"captions": [f"chip {i}"], "footprint": {"type": "Polygon", "coordinates": [ring]}}
            for name, data in ((f"{key}.jpg", image), (f"{key}.json", json.dumps(doc).encode())):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    searcher = Searcher(info["store"], read_only=True, cache_dir=root / "cache")
    vec = searcher.encoders.encode_texts([FOOTPRINT_QUERY])[0]
    cols = {
        "key": keys,
        "source": [f"tar://{k}.jpg::{tar_path}" for k in keys],
        "split": ["test"] * 3,
        "class": ["chip"] * 3,
        "lat": [50.25] * 3,
        "lon": [10.4 + i for i in range(3)],
    }
    writer = VersionWriter(EmbeddingStore(info["store"]), info["model_id"], snap.model)
    vecs = np.stack([vec, vec, vec]) + np.float32(1e-4) * np.arange(3)[:, None]
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)  # stored embeddings are unit vectors
    writer.stage(
        {"id": "chips.tar", "bad": []},
        {"images": build_table("images", cols, vecs, dim=len(vec), model_id=info["model_id"])},
    )
    writer.commit()
    writer.close()
    searcher.refresh()
    with ThreadServer(create_app(searcher, ServeOptions(), token=TOKEN)) as srv:
        yield srv
    searcher.close()


def test_a_token_server_page_shows_thumbnails_and_footprints(chrome, geo_server):
    page = chrome.page()
    page.goto(geo_server.url + "/")
    page.wait_for("getComputedStyle(document.getElementById('token-box')).display !== 'none'")
    page.type("#token", TOKEN)
    page.enter()
    page.wait_for("document.getElementById('token-box').hidden")
    page.type("#k", "3")
    page.type("#q", FOOTPRINT_QUERY)
    page.enter()
    wait_results(page, 3)
    srcs = page.eval("Array.from(document.querySelectorAll('.hit img')).map(i => i.src)")
    assert all(s.startswith("blob:") for s in srcs)  # fetched with the bearer header
    assert sorted(page.eval("Array.from(document.querySelectorAll('.hit')).map(h => h.dataset.key)")) == [
        "chips__c0",
        "chips__c1",
        "chips__c2",
    ]
    page.wait_for("getComputedStyle(document.getElementById('footprints')).display !== 'none'")
    assert page.eval("document.querySelectorAll('#map polygon').length") == 3
    page.eval("document.querySelector('.hit').focus()")
    assert page.eval("document.querySelectorAll('#map polygon.active').length") == 1
