"""Retrieval metrics with the RS papers' protocol (AMFMN / GaLR / SWAN evaluation code), computed in blocks.

similarity [n_images, n_captions]; caption_image[j] = index of caption j's image.
- image -> text: the rank of image i is the best (smallest) rank among its own captions;
- text -> image: the rank of caption j is the rank of its image;
- R@K = 100 * mean(rank < K) (ranks start at 0); mR = mean of the 2 * len(ks) recalls.
With `image_class` (one class index per image, -1 = unlabelled), class-level recall is added: a hit is any item of
the same class (the keys `i2t_cls_r1`, ..., `cls_mr`); unlabelled images and their captions are left out of it.

Ties: the order is a *stable* descending sort, i.e. among items with exactly equal similarity the one with the
smaller index comes first. The rank of item c among candidates is
    #{candidates with similarity > s_c} + #{candidates with index < c and similarity == s_c}.
So exact duplicates (UCM repeats captions verbatim; identical captions get identical embeddings) neither all
count as hits nor all as misses; the result is deterministic and equals `np.argsort(-s, kind="stable")`.

Memory: images and captions are processed in blocks of `block` rows/columns, so besides the input only
O(block * max(n_images, n_captions)) extra memory is used. `retrieval_metrics_from_embeddings` never builds the
full similarity matrix at all (10k images x 50k captions stays well under 1 GB).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.from_numpy(np.asarray(x))


def _ranks_of_best(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank (0-based, stable order) of the best-ranked target in each row.

    scores [b, n]; target [b, n] bool (at least one true per row, else rank = n). The best target is the one with
    the highest score, the smallest index among ties; its rank counts the higher scores and the equal ones before it.
    """
    n = scores.shape[1]
    has = target.any(1)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype)
    best = torch.where(target, scores, neg_inf).max(1, keepdim=True).values  # [b, 1]
    first = (
        (target & (scores == best)).to(torch.int8).argmax(1, keepdim=True)
    )  # first index of the best target
    idx = torch.arange(n).unsqueeze(0)
    rank = (scores > best).sum(1) + ((scores == best) & (idx < first)).sum(1)
    return torch.where(has, rank, torch.full_like(rank, n))


def _recalls(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    if ranks.numel() == 0:
        return {f"{prefix}_r{k}": float("nan") for k in ks}
    return {f"{prefix}_r{k}": 100.0 * float((ranks < k).double().mean()) for k in ks}


def _blocked_metrics(
    score_rows: Callable[[int, int], torch.Tensor],
    score_cols: Callable[[int, int], torch.Tensor],
    n_images: int,
    caption_image: torch.Tensor,
    image_class: torch.Tensor | None,
    ks: Sequence[int],
    block: int,
) -> dict[str, float]:
    n_captions = len(caption_image)
    if n_images == 0 or n_captions == 0:
        raise ValueError(f"retrieval metrics need images and captions (got {n_images} and {n_captions})")
    if int(caption_image.min()) < 0 or int(caption_image.max()) >= n_images:
        raise ValueError(f"caption_image holds image indices outside [0, {n_images})")
    caption_class = image_class[caption_image] if image_class is not None else None

    i2t, i2t_cls, t2i, t2i_cls = [], [], [], []
    has_caption = torch.zeros(n_images, dtype=torch.bool)
    has_caption[caption_image] = True
    for start in range(0, n_images, block):
        stop = min(start + block, n_images)
        s = score_rows(start, stop)  # [b, n_captions]
        rows = torch.arange(start, stop).unsqueeze(1)
        i2t.append(_ranks_of_best(s, caption_image.unsqueeze(0) == rows)[has_caption[start:stop]])
        if caption_class is not None:
            cls = image_class[start:stop].unsqueeze(1)
            valid = image_class[start:stop] >= 0
            i2t_cls.append(_ranks_of_best(s, caption_class.unsqueeze(0) == cls)[valid])
    for start in range(0, n_captions, block):
        stop = min(start + block, n_captions)
        s = score_cols(start, stop).T  # [b, n_images]
        own = caption_image[start:stop].unsqueeze(1) == torch.arange(n_images).unsqueeze(0)
        t2i.append(_ranks_of_best(s, own))
        if caption_class is not None:
            cls = caption_class[start:stop]
            t2i_cls.append(_ranks_of_best(s, cls.unsqueeze(1) == image_class.unsqueeze(0))[cls >= 0])

    out = {**_recalls(torch.cat(i2t), ks, "i2t"), **_recalls(torch.cat(t2i), ks, "t2i")}
    out["mr"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]))
    if caption_class is not None:
        out.update(_recalls(torch.cat(i2t_cls), ks, "i2t_cls"))
        out.update(_recalls(torch.cat(t2i_cls), ks, "t2i_cls"))
        out["cls_mr"] = float(np.mean([out[f"{d}_cls_r{k}"] for d in ("i2t", "t2i") for k in ks]))
    out["n_images"] = n_images
    out["n_captions"] = n_captions
    return out


def retrieval_metrics(
    similarity,
    caption_image,
    image_class=None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways and mR (percent) for a similarity matrix [n_images, n_captions] (numpy or torch)."""
    sim = _as_tensor(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D [n_images, n_captions], got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        sim = sim.double()
    cap = _as_tensor(caption_image).long().reshape(-1)
    if len(cap) != sim.shape[1]:
        raise ValueError(f"caption_image has {len(cap)} entries but similarity has {sim.shape[1]} captions")
    cls = None
    if image_class is not None:
        cls = _as_tensor(image_class).long().reshape(-1)
        if len(cls) != sim.shape[0]:
            raise ValueError(f"image_class has {len(cls)} entries but similarity has {sim.shape[0]} images")
    return _blocked_metrics(
        lambda a, b: sim[a:b], lambda a, b: sim[:, a:b], sim.shape[0], cap, cls, ks, block
    )


def retrieval_metrics_from_embeddings(
    image_emb,
    caption_emb,
    caption_image,
    image_class=None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block: int = 1024,
) -> dict[str, float]:
    """Same as `retrieval_metrics` for cosine/dot similarity image_emb [N, D] @ caption_emb [M, D].T, computed
    block by block without materialising the [N, M] matrix."""
    img = _as_tensor(image_emb).float()
    txt = _as_tensor(caption_emb).float()
    cap = _as_tensor(caption_image).long().reshape(-1)
    if len(cap) != len(txt):
        raise ValueError(f"caption_image has {len(cap)} entries but there are {len(txt)} caption embeddings")
    cls = _as_tensor(image_class).long().reshape(-1) if image_class is not None else None
    return _blocked_metrics(
        lambda a, b: img[a:b] @ txt.T, lambda a, b: img @ txt[a:b].T, len(img), cap, cls, ks, block
    )
