"""Retrieval losses: hand-computed triplet values, STL == triplet at kappa = 0, STL relief on same-class pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssjdn.losses import infonce_loss, same_item_mask, semantic_agreement, stl_loss, triplet_loss
from ssjdn.lsd import lsd_loss
from tests.fixtures_torch import single_torch_thread  # noqa: F401  (autouse)


def _random_sim(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    return (img @ txt.T).requires_grad_()


def test_triplet_hand_case():
    sim = torch.tensor([[0.5, 0.4], [0.1, 0.2]])
    # i2t: anchor image 0, negative caption 1: 0.2 + 0.4 - 0.5 = 0.1; image 1, caption 0: 0.2 + 0.1 - 0.2 = 0.1
    # t2i: anchor caption 0, negative image 1: 0.2 + 0.1 - 0.5 = 0 (clamped); caption 1, image 0: 0.2 + 0.4 - 0.2 = 0.4
    assert triplet_loss(sim, 0.2, "sum").item() == pytest.approx((0.1 + 0.1 + 0.0 + 0.4) / 2)
    sim3 = torch.tensor([[0.9, 0.8, 0.1], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]])
    # hardest: only the worst negative per anchor; image 0 -> caption 1 (0.1), caption 1 -> image 0 (0.1)
    assert triplet_loss(sim3, 0.2, "hardest").item() == pytest.approx((0.1 + 0.1) / 3)
    assert triplet_loss(sim3, 0.2, "sum").item() == pytest.approx((0.1 + 0.1) / 3)


@pytest.mark.parametrize("variant", ["sum", "hardest"])
def test_stl_equals_triplet_when_constant_is_zero(variant):
    sim = _random_sim()
    labels = torch.tensor([0, 0, 1, 1, 2, -1, 2, 0])
    agreement = semantic_agreement(
        labels, torch.softmax(torch.randn(8, 3), -1), torch.softmax(torch.randn(8, 3), -1)
    )
    plain = triplet_loss(sim, 0.2, variant)
    (g_plain,) = torch.autograd.grad(plain, sim)
    for agr, relief in ((agreement, 0.0), (None, 1.0), (torch.zeros(8, 8), 1.0)):
        loss, kappa = stl_loss(sim, agr, 0.2, relief, variant)
        (g,) = torch.autograd.grad(loss, sim)
        assert torch.equal(kappa, torch.zeros(8, 8))
        assert torch.equal(loss, plain) and torch.equal(g, g_plain)


def test_stl_relieves_only_same_class_negatives():
    # image 0's hardest negative is caption 1 of the same class; caption 2 (other class) is harmless.
    sim = torch.tensor([[0.5, 0.6, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])
    labels = torch.tensor([3, 3, 4])
    agreement = semantic_agreement(labels, mode="labels")
    plain = triplet_loss(sim, 0.2, "sum")
    stl, kappa = stl_loss(sim, agreement, 0.2, 1.0, "sum")
    assert kappa[0, 1] == pytest.approx(0.2) and kappa[0, 2] == 0.0
    # same-class negatives keep margin 0: 0.6 - 0.5 = 0.1 remains for (image 0, caption 1) only
    assert plain.item() == pytest.approx((0.3 + 0.3) / 3)
    assert stl.item() == pytest.approx((0.1 + 0.1) / 3)
    # a different-class batch is untouched
    other = torch.tensor([0, 1, 2])
    assert torch.equal(stl_loss(sim, semantic_agreement(other), 0.2, 1.0)[0], triplet_loss(sim, 0.2))


def test_semantic_agreement_modes():
    labels = torch.tensor([0, 0, -1])
    p_img = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    p_txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.2, 0.8]])
    auto = semantic_agreement(labels, p_img, p_txt)
    assert auto[0, 1] == 1.0  # both labelled, same class
    assert auto[2, 2] == pytest.approx(0.8) and auto[0, 2] == pytest.approx(0.5)  # posterior fallback
    lab = semantic_agreement(labels, mode="labels")
    assert lab[0, 2] == 0.0 and lab[1, 0] == 1.0
    assert semantic_agreement(torch.tensor([-1, -1]), mode="labels") is None
    assert torch.equal(semantic_agreement(labels, p_img, p_txt, mode="posterior"), p_img @ p_txt.T)


def test_ignore_mask_removes_same_image_pairs():
    sim = torch.tensor([[0.5, 0.9], [0.9, 0.5]])
    same = same_item_mask(torch.tensor([7, 7]))
    assert same.tolist() == [[False, True], [True, False]]
    assert triplet_loss(sim, 0.2, "hardest", same).item() == 0.0
    assert triplet_loss(sim, 0.2, "hardest").item() > 0.0
    assert torch.isfinite(infonce_loss(sim, 0.1, same))


def test_infonce_matches_manual_cross_entropy():
    sim = _random_sim(6, seed=3)
    logits = sim / 0.05
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    assert torch.allclose(infonce_loss(sim, 0.05), want)


def test_lsd_loss_ignores_unlabelled_samples():
    torch.manual_seed(0)
    img_logits = torch.randn(3, 4, requires_grad=True)
    txt_logits = torch.randn(3, 4, requires_grad=True)
    loss = lsd_loss(img_logits, txt_logits, torch.tensor([-1, 2, -1]))
    want = F.cross_entropy(img_logits[1:2], torch.tensor([2])) + F.cross_entropy(
        txt_logits[1:2], torch.tensor([2])
    )
    assert torch.allclose(loss, want)
    loss.backward()
    assert img_logits.grad[[0, 2]].abs().sum() == 0 and img_logits.grad[1].abs().sum() > 0
    none = lsd_loss(img_logits, txt_logits, torch.tensor([-1, -1, -1]))
    assert none.item() == 0.0 and none.requires_grad


def test_stl_infonce_is_infonce_without_relief():
    from ssjdn.losses import stl_infonce_loss

    sim = _random_sim()
    labels = torch.tensor([0, 0, 1, 1, 2, -1, 2, 0])
    agreement = semantic_agreement(labels)
    ignore = same_item_mask(torch.tensor([0, 1, 2, 3, 4, 5, 6, 1]))
    plain = infonce_loss(sim, 0.07, ignore)
    for agr, relief in ((agreement, 0.0), (None, 1.0)):
        got, weight = stl_infonce_loss(sim, agr, 0.07, relief, ignore)
        assert torch.allclose(got, plain) and torch.equal(weight, torch.ones(8, 8))


def test_stl_infonce_down_weights_same_class_negatives():
    from ssjdn.losses import stl_infonce_loss

    sim = _random_sim()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    agreement = semantic_agreement(labels)
    full, weight = stl_infonce_loss(sim, agreement, 0.07, 1.0)
    assert torch.equal(weight.diag(), torch.ones(8)) and weight[0, 1] == 0 and weight[0, 2] == 1
    # relief 1 on hard labels == InfoNCE with the same-class negatives left out of the softmax
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(8, dtype=torch.bool)
    assert torch.allclose(full, infonce_loss(sim, 0.07, same))
    (grad,) = torch.autograd.grad(full, sim)
    assert torch.isfinite(grad).all() and grad[0, 1] == 0 and grad[0, 2] != 0
    # a half relief lies in between and keeps a reduced gradient on the same-class pair
    half, w_half = stl_infonce_loss(sim, agreement, 0.07, 0.5)
    assert w_half[0, 1] == pytest.approx(0.5)
    assert full < half < infonce_loss(sim, 0.07) or full > half > infonce_loss(sim, 0.07)
