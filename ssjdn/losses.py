"""Retrieval losses on a batch similarity matrix sim [B, B] (row i: image i, column j: caption j; sim[i, i] matches).

- `triplet_loss`: bidirectional hinge loss with in-batch negatives, `sum` (all negatives) or `hardest` (VSE++).
  An optional per-negative margin matrix [B, B] replaces the scalar margin.
- `stl_loss`: Semantic-guided Triplet Loss (our interpretation, docs/model.md): the margin of the negative pair
  (image i, caption j) is  m_ij = margin - kappa_ij,  kappa_ij = relief * margin * a_ij, where a_ij in [0, 1] is the
  semantic agreement of image i and caption j (same scene label, or the LSD posteriors' probability of a shared
  class). Same-class negatives - often true matches in RS captions - are pushed apart less, or not at all.
  kappa = 0 gives exactly `triplet_loss`.
- `infonce_loss`: symmetric InfoNCE with a fixed temperature.
- `stl_infonce_loss`: STL in contrastive form: InfoNCE whose negative (i, j) enters the partition function with
  the weight w_ij = 1 - kappa_ij / margin = 1 - relief * a_ij (clamped to [0, 1]), i.e. the same adaptive
  constant as STL down-weights same-class negatives; relief = 0 (or no agreement) gives exactly `infonce_loss`.
Pairs in `ignore` [B, B] (e.g. two crops of the same image in one batch) are neither positives nor negatives.
Losses are averaged over anchors (divided by B) so that their scale does not depend on the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_item_mask(key_ids: torch.Tensor) -> torch.Tensor:
    """[B, B] true where two different batch rows hold the same image (off-diagonal only)."""
    same = key_ids.unsqueeze(0) == key_ids.unsqueeze(1)
    return same & ~torch.eye(len(key_ids), dtype=torch.bool, device=key_ids.device)


def triplet_loss(
    sim: torch.Tensor,
    margin: float | torch.Tensor = 0.2,
    variant: str = "hardest",
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    n = sim.shape[0]
    pos = sim.diag()
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    if ignore is not None:
        off = off & ~ignore
    cost_caption = (margin + sim - pos.unsqueeze(1)).clamp(
        min=0
    ) * off  # anchor image i (row), negative caption j
    cost_image = (margin + sim - pos.unsqueeze(0)).clamp(
        min=0
    ) * off  # anchor caption j (column), negative image i
    if variant == "hardest":
        total = cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    elif variant == "sum":
        total = cost_caption.sum() + cost_image.sum()
    else:
        raise ValueError(f"unknown triplet variant {variant!r} (sum | hardest)")
    return total / n


def semantic_agreement(
    labels: torch.Tensor | None,
    image_post: torch.Tensor | None = None,
    text_post: torch.Tensor | None = None,
    mode: str = "auto",
) -> torch.Tensor | None:
    """a [B, B] in [0, 1]: agreement of image i and caption j, or None when nothing is known.

    labels [B] (-1 = unlabelled): 1 for the same class, 0 otherwise, where both are labelled.
    posteriors [B, K]: a_ij = sum_k p_img[i, k] p_txt[j, k], the probability that both show the same class.
    auto: labels where both are labelled, posteriors elsewhere (or 0 without LSD).
    """
    post = None
    if image_post is not None and text_post is not None:
        post = (image_post.float() @ text_post.float().T).detach()
    if mode == "posterior":
        return post
    if labels is None or not bool((labels >= 0).any()):
        return None if mode == "labels" else post
    known = (labels >= 0).unsqueeze(1) & (labels >= 0).unsqueeze(0)
    same = (labels.unsqueeze(1) == labels.unsqueeze(0)).float()
    if mode == "labels" or post is None:
        return same * known
    return torch.where(known, same, post)


def stl_loss(
    sim: torch.Tensor,
    agreement: torch.Tensor | None,
    margin: float = 0.2,
    relief: float = 1.0,
    variant: str = "hardest",
    ignore: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, kappa [B, B]); kappa is the adaptively generated constant subtracted from each margin."""
    if agreement is None:
        kappa = torch.zeros_like(sim)
    else:
        kappa = (relief * margin) * agreement.to(sim.dtype)
    return triplet_loss(sim, margin - kappa, variant, ignore), kappa


def infonce_loss(
    sim: torch.Tensor, temperature: float = 0.07, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    logits = sim / temperature
    if ignore is not None:
        logits = logits.masked_fill(ignore, float("-inf"))
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def stl_infonce_loss(
    sim: torch.Tensor,
    agreement: torch.Tensor | None,
    temperature: float = 0.07,
    relief: float = 1.0,
    ignore: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, w [B, B]): w_ij weighs negative (i, j) in the softmax's denominator (diagonal: 1)."""
    if agreement is None:
        return infonce_loss(sim, temperature, ignore), torch.ones_like(sim)
    n = sim.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    weight = (1 - relief * agreement.to(sim.dtype)).clamp(0, 1).masked_fill(eye, 1.0).detach()
    # log w: a weight-w negative counts w times in sum_j exp(s_ij / tau); w = 0 gives -inf (left out).
    logits = sim / temperature + torch.log(weight)
    if ignore is not None:
        logits = logits.masked_fill(ignore, float("-inf"))
    target = torch.arange(n, device=sim.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)), weight
