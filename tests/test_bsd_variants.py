"""BSD variants (model.bsd_cfg) and the contrastive STL loss: shapes, gradients, and default == the original BSD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssjdn.bsd import BSD, resample
from ssjdn.config import ConfigError, load_config
from tests.fixtures_torch import single_torch_thread  # noqa: F401  (autouse)
from tests.test_model import _grad_report, build, make_batch, tiny_cfg

VARIANTS = {
    "parallel": {"model.bsd_cfg.direction": "parallel"},
    "content": {"model.bsd_cfg.suppression": "content"},
    "parallel_content": {"model.bsd_cfg.direction": "parallel", "model.bsd_cfg.suppression": "content"},
    "gate": {"model.bsd_cfg.fusion": "gate"},
    "scale_loss": {"model.bsd_cfg.scale_loss_weight": 0.5},
}


# --- a frozen copy of the BSD module as it was before the variants (the reference for "default == old") -------
class _OldSFE(nn.Module):
    def __init__(self, width):
        super().__init__()
        hidden = max(width // 4, 8)
        self.score = nn.Sequential(
            nn.Conv2d(width, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1, bias=False),
        )

    def forward(self, x):
        z = self.score(x)
        attn = torch.softmax(z.flatten(2), dim=-1)
        return z, (x.flatten(2) * attn).sum(-1)


class _OldSGS(nn.Module):
    def __init__(self, init):
        super().__init__()
        self.beta_logit = nn.Parameter(torch.tensor(math.log(init / (1 - init))))
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, x, prev_logits):
        salience = torch.sigmoid(prev_logits + self.offset)
        mask = resample(salience, x.shape[-2:])
        return x * (1 - torch.sigmoid(self.beta_logit) * mask), salience


class _OldBSD(nn.Module):
    def __init__(self, num_scales, width, embed_dim, suppression_init, dropout):
        super().__init__()
        self.sfe_f2c = nn.ModuleList(_OldSFE(width) for _ in range(num_scales))
        self.sfe_c2f = nn.ModuleList(_OldSFE(width) for _ in range(num_scales))
        self.sgs_f2c = nn.ModuleList(_OldSGS(suppression_init) for _ in range(num_scales - 1))
        self.sgs_c2f = nn.ModuleList(_OldSGS(suppression_init) for _ in range(num_scales - 1))
        self.norm = nn.LayerNorm(width)
        self.fuse = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * num_scales * width, embed_dim))

    @staticmethod
    def _pass(maps, sfe, sgs):
        clues, masks, prev = [], [], None
        for i, x in enumerate(maps):
            if prev is not None:
                x, mask = sgs[i - 1](x, prev)
                masks.append(mask)
            prev, f = sfe[i](x)
            clues.append(f)
        return clues, masks

    def forward(self, maps):
        f2c, m1 = self._pass(maps, self.sfe_f2c, self.sgs_f2c)
        c2f, m2 = self._pass(maps[::-1], self.sfe_c2f, self.sgs_c2f)
        clues = torch.cat([self.norm(c) for c in f2c + c2f[::-1]], dim=-1)
        return self.fuse(clues), {"masks_f2c": m1, "masks_c2f": m2}


def _maps(b=4, width=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, width, s, s, generator=g) for s in (8, 4, 2)]


def test_default_bsd_is_the_original_bit_for_bit():
    torch.manual_seed(0)
    old = _OldBSD(3, 16, 24, 0.5, 0.1)
    old_rng = torch.get_rng_state()
    torch.manual_seed(0)
    new = BSD(3, 16, 24, 0.5, 0.1)
    assert torch.equal(
        torch.get_rng_state(), old_rng
    )  # same random draws: the rest of the model is unchanged
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(old_sd) == list(new_sd)
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in old_sd)
    maps = _maps()
    for mode in ("train", "eval"):
        getattr(old, mode)()
        getattr(new, mode)()
        torch.manual_seed(1)
        ref, ref_aux = old(maps)
        torch.manual_seed(1)
        got, got_aux = new(maps)
        assert torch.equal(ref, got), mode
        for k in ("masks_f2c", "masks_c2f"):
            assert all(torch.equal(a, b) for a, b in zip(ref_aux[k], got_aux[k], strict=True))


def test_variant_keys_off_give_the_same_model_as_before():
    torch.manual_seed(0)
    a, tok = build(tiny_cfg())
    torch.manual_seed(0)
    b, _ = build(tiny_cfg(**{"model.bsd_cfg.direction": "chain", "model.bsd_cfg.fusion": "concat"}))
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    batch = make_batch(tok)
    torch.manual_seed(1)
    la = a(batch)["loss"]
    torch.manual_seed(1)
    lb = b(batch)["loss"]
    assert torch.equal(la, lb)
    assert "loss_scale" not in a(batch)


@pytest.mark.parametrize("direction", ["chain", "parallel"])
@pytest.mark.parametrize("suppression", ["spatial", "content"])
@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_bsd_variant_shapes_and_masks(direction, suppression, fusion):
    torch.manual_seed(0)
    bsd = BSD(
        3, 16, 24, 0.5, 0.0, direction=direction, suppression=suppression, fusion=fusion, scale_heads=True
    )
    maps = _maps()
    emb, aux = bsd(maps)
    assert emb.shape == (4, 24)
    assert len(aux["clues"]) == 6 and all(c.shape == (4, 16) for c in aux["clues"])
    masks = aux["masks"] if direction == "parallel" else aux["masks_f2c"] + aux["masks_c2f"]
    assert len(masks) == (3 if direction == "parallel" else 4)
    assert all(((m >= 0) & (m <= 1)).all() for m in masks)
    if direction == "parallel":  # each mask lies on the scale it suppresses
        assert [tuple(m.shape) for m in masks] == [(4, 1, s, s) for s in (8, 4, 2)]
    if fusion == "gate":
        gate = aux["gate"]
        assert gate.shape == (4, 6) and torch.allclose(gate.sum(-1), torch.ones(4))
    embs = bsd.scale_embeddings(aux["clues"])
    assert len(embs) == 6 and all(torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5) for e in embs)


def test_gate_starts_as_concatenation():
    torch.manual_seed(0)
    concat = BSD(3, 16, 24, 0.5, 0.0)
    torch.manual_seed(0)
    gate = BSD(3, 16, 24, 0.5, 0.0, fusion="gate")
    gate.load_state_dict({**gate.state_dict(), **concat.state_dict()})
    maps = _maps()
    assert torch.allclose(concat(maps)[0], gate(maps)[0], atol=1e-6)


def test_parallel_suppression_uses_every_other_scale():
    """Changing the coarsest scale changes the mask applied to the finest one (not only its neighbour's)."""
    torch.manual_seed(0)
    bsd = BSD(3, 16, 24, 0.5, 0.0, direction="parallel").eval()
    maps = _maps()
    _, aux = bsd(maps)
    changed = [maps[0], maps[1], maps[2] * -3.0]
    _, aux2 = bsd(changed)
    assert not torch.allclose(aux["masks"][0], aux2["masks"][0])


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("loss", ["stl", "stl_nce"])
def test_gradients_reach_every_variant_module(name, loss):
    torch.manual_seed(0)
    model, tok = build(tiny_cfg(**VARIANTS[name], **{"loss.name": loss, "loss.variant": "sum"}))
    batch = make_batch(tok)
    assert _grad_report(model, batch) == []
    out = model(batch)
    assert torch.isfinite(out["loss"])
    if name == "scale_loss":
        assert "loss_scale" in out and out["loss_scale"] > 0
        # the scale heads serve the auxiliary loss only: the embedding does not depend on them
        head = model.image_head.scale_heads[0].weight
        model.eval()
        before = model.encode_image(batch["pixels"])
        with torch.no_grad():
            head.add_(1.0)
        assert torch.equal(before, model.encode_image(batch["pixels"]))


def test_variants_are_ignored_without_bsd():
    torch.manual_seed(0)
    a, tok = build(tiny_cfg(**{"model.bsd": False}))
    torch.manual_seed(0)
    b, _ = build(tiny_cfg(**{"model.bsd": False, **VARIANTS["parallel"], **VARIANTS["scale_loss"]}))
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


@pytest.mark.parametrize(
    "key,value",
    [("direction", "both"), ("suppression", "where"), ("fusion", "sum"), ("scale_loss_weight", -1)],
)
def test_bad_variant_values_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"model.bsd_cfg.{key}"):
        load_config("tiny", {f"model.bsd_cfg.{key}": value})


def test_content_suppression_damps_positions_like_the_clue():
    from ssjdn.bsd import ContentSGS

    unit = ContentSGS(0.5)
    f = torch.tensor([[1.0, 0.0]])
    x = torch.zeros(1, 2, 1, 2)
    x[0, :, 0, 0] = torch.tensor([2.0, 0.0])  # parallel to f: strongly suppressed
    x[0, :, 0, 1] = torch.tensor([0.0, 2.0])  # orthogonal to f: mask sigmoid(0) = 0.5
    with torch.no_grad():
        out, mask = unit(x, torch.zeros(1, 1, 1, 1), f)
    assert mask[0, 0, 0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), rel=1e-5)
    assert mask[0, 0, 0, 1].item() == pytest.approx(0.5)
    assert out[0, 0, 0, 0] < out[0, 1, 0, 1]
    assert F.cosine_similarity(out[0, :, 0, 0], f[0], dim=0).item() == pytest.approx(1.0)
