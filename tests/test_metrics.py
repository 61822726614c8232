"""Retrieval metrics against a brute-force reference (stable descending sort) and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssjdn.metrics import retrieval_metrics, retrieval_metrics_from_embeddings
from tests.fixtures_torch import single_torch_thread  # noqa: F401  (autouse)


def brute_force(sim: np.ndarray, caption_image: np.ndarray, image_class=None, ks=(1, 5, 10)) -> dict:
    """The RS papers' loops, with a stable descending sort for a defined tie order."""
    n_img, n_cap = sim.shape
    i2t, t2i, i2t_c, t2i_c = [], [], [], []
    for i in range(n_img):
        order = np.argsort(-sim[i], kind="stable")
        own = [r for r, c in enumerate(order) if caption_image[c] == i]
        if own:
            i2t.append(min(own))
        if image_class is not None and image_class[i] >= 0:
            i2t_c.append(
                min(r for r, c in enumerate(order) if image_class[caption_image[c]] == image_class[i])
            )
    for j in range(n_cap):
        order = np.argsort(-sim[:, j], kind="stable")
        t2i.append(int(np.where(order == caption_image[j])[0][0]))
        cls = image_class[caption_image[j]] if image_class is not None else -1
        if cls >= 0:
            t2i_c.append(min(r for r, i in enumerate(order) if image_class[i] == cls))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * np.mean(np.asarray(ranks) < k)
    out["mr"] = np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks])
    if image_class is not None:
        for name, ranks in (("i2t_cls", i2t_c), ("t2i_cls", t2i_c)):
            for k in ks:
                out[f"{name}_r{k}"] = 100.0 * np.mean(np.asarray(ranks) < k)
        out["cls_mr"] = np.mean([out[f"{d}_cls_r{k}"] for d in ("i2t", "t2i") for k in ks])
    return out


def assert_same(got: dict, want: dict) -> None:
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(3, 40))
    caption_image = np.concatenate([np.full(int(rng.integers(1, 7)), i) for i in range(n_img)])
    rng.shuffle(caption_image)
    shape = (n_img, len(caption_image))
    # integer-valued scores force many exact ties
    sim = (
        rng.integers(0, 4, shape).astype(np.float32)
        if ties
        else rng.standard_normal(shape).astype(np.float32)
    )
    image_class = rng.integers(-1, 4, n_img)
    image_class[0] = 0
    want = brute_force(sim, caption_image, image_class)
    for block in (1, 3, 1024):
        assert_same(retrieval_metrics(sim, caption_image, image_class, block=block), want)
    assert_same(retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(caption_image), image_class), want)


def test_from_embeddings_equals_similarity_path():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((17, 8)).astype(np.float32)
    txt = rng.standard_normal((59, 8)).astype(np.float32)
    caption_image = np.repeat(np.arange(17), [4] * 8 + [3] * 9)
    classes = np.arange(17) % 3
    ref = retrieval_metrics(img @ txt.T, caption_image, classes)
    assert_same(retrieval_metrics_from_embeddings(img, txt, caption_image, classes, block=4), ref)


def test_hand_made_case():
    # 2 images, 4 captions: captions 0,1 belong to image 0; captions 2,3 to image 1.
    sim = np.array(
        [
            [0.1, 0.9, 0.5, 0.2],  # image 0: best own caption (1) at rank 0
            [0.8, 0.7, 0.6, 0.3],  # image 1: best own caption (2) at rank 2
        ]
    )
    m = retrieval_metrics(sim, [0, 0, 1, 1], ks=(1, 2))
    # i2t ranks [0, 2]; t2i ranks: c0 -> 1 (image 1 scores higher), c1 -> 0, c2 -> 0, c3 -> 0
    assert m["i2t_r1"] == 50.0 and m["i2t_r2"] == 50.0
    assert m["t2i_r1"] == 75.0 and m["t2i_r2"] == 100.0
    assert m["mr"] == pytest.approx((50 + 50 + 75 + 100) / 4)
    assert set(m) == {"i2t_r1", "i2t_r2", "t2i_r1", "t2i_r2", "mr", "n_images", "n_captions"}


def test_ties_follow_index_order():
    # every score equal: the stable order is the index order.
    sim = np.zeros((3, 3))
    m = retrieval_metrics(sim, [0, 1, 2], ks=(1, 2, 3))
    # image i's caption i sits at rank i; caption j's image j sits at rank j.
    for d in ("i2t", "t2i"):
        assert m[f"{d}_r1"] == pytest.approx(100 / 3)
        assert m[f"{d}_r2"] == pytest.approx(200 / 3)
        assert m[f"{d}_r3"] == 100.0


def test_class_level_hits_any_same_class_item():
    sim = np.array([[0.0, 1.0], [1.0, 0.0]])  # each image prefers the other image's caption
    m = retrieval_metrics(sim, [0, 1], image_class=[5, 5], ks=(1,))
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert m["i2t_cls_r1"] == 100.0 and m["t2i_cls_r1"] == 100.0
    m = retrieval_metrics(sim, [0, 1], image_class=[5, 6], ks=(1,))
    assert m["cls_mr"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(4), [0, 1, 2, 3])
