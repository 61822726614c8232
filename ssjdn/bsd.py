"""Bidirectional Scale Decoupling (BSD): Salience Feature Extraction (SFE) + Salience-Guided Suppression (SGS).

Our interpretation of the paper's abstract (see docs/model.md for the equations):
- SFE on a scale map X [B, C, H, W]: salience logits z = conv1x1(relu(bn(conv3x3(X)))) [B, 1, H, W];
  salient feature f = sum_hw softmax_hw(z) X [B, C].
- SGS at the next scale X' [B, C, H', W']: soft mask S = sigmoid(z + t) of the previous scale (t learnable offset),
  X~' = X' * (1 - beta * resample(S, H' x W')), beta = sigmoid(b) learnable, so the next scale looks at what the
  previous one did not already capture.
- Two passes, fine->coarse and coarse->fine, each with its own SFE units; the 2 x n_scales clues are normalised,
  concatenated and linearly fused into the image embedding [B, D].

Variants (`model.bsd_cfg`, all off by default; the default is the module above, bit for bit):
- `direction: parallel`: every scale is suppressed by the salience of all the other scales at once (a soft OR of
  their masks) instead of by its neighbour in a chain; clues = S unsuppressed + S suppressed features.
- `suppression: content`: the suppression map of a scale comes from *what* the other scale extracted (cosine
  similarity of each position to that scale's salient feature), not from *where* it was salient.
- `fusion: gate`: a per-sample softmax gate over the clues rescales each before the linear fusion (uniform at
  initialisation, i.e. exactly the concatenation + linear).
- `scale_heads=True` (`scale_loss_weight > 0`): one linear head per clue, so the model can give each clue its own
  retrieval loss (`ssjdn.model`).
`GlobalPoolHead` is the head used when BSD is switched off (VSE++: average pooling of the last stage).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIRECTIONS = ("chain", "parallel")
SUPPRESSIONS = ("spatial", "content")
FUSIONS = ("concat", "gate")


def resample(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a soft mask [B, 1, h, w] to `size`: area averaging when shrinking, bilinear when growing."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(mask, size)
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class SFE(nn.Module):
    """Salience Feature Extraction: X [B, C, H, W] -> (salience logits z [B, 1, H, W], salient feature f [B, C])."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hidden = max(width // 4, 8)
        self.score = nn.Sequential(
            nn.Conv2d(width, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(
                hidden, 1, 1, bias=False
            ),  # a bias would cancel in the softmax; SGS owns the mask offset
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.score(x)  # [B, 1, H, W]
        attn = torch.softmax(z.flatten(2), dim=-1)  # [B, 1, HW]
        feature = (x.flatten(2) * attn).sum(-1)  # [B, C]
        return z, feature


class SGS(nn.Module):
    """Salience-Guided Suppression: damp at this scale what the previous scale's salience already covered."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.beta_logit = nn.Parameter(torch.tensor(_logit(init)))
        self.offset = nn.Parameter(torch.zeros(()))

    def mask(self, x: torch.Tensor, logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Suppression map of the source scale, resampled to x: [B, 1, H', W'] in (0, 1)."""
        return resample(torch.sigmoid(logits + self.offset), x.shape[-2:])

    def forward(
        self, x: torch.Tensor, prev_logits: torch.Tensor, prev_feature: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (suppressed X~' [B, C, H', W'], the previous scale's soft salience mask S [B, 1, h, w])."""
        salience = torch.sigmoid(prev_logits + self.offset)
        mask = resample(salience, x.shape[-2:])
        return x * (1 - torch.sigmoid(self.beta_logit) * mask), salience


class ContentSGS(SGS):
    """Suppression by content ("salience suppression map", our reading): positions of X' whose features resemble
    the salient feature f already extracted at the source scale are damped. Q_p = sigmoid(g * cos(X'_p, f) + t)."""

    def __init__(self, init: float, gain: float = 5.0) -> None:
        super().__init__(init)
        self.log_gain = nn.Parameter(torch.tensor(math.log(gain)))

    def mask(self, x: torch.Tensor, logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        cos = (F.normalize(x, dim=1) * F.normalize(feature, dim=1)[:, :, None, None]).sum(1, keepdim=True)
        return torch.sigmoid(self.log_gain.exp() * cos + self.offset)  # [B, 1, H', W']

    def forward(
        self, x: torch.Tensor, prev_logits: torch.Tensor, prev_feature: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.mask(x, prev_logits, prev_feature)
        return x * (1 - torch.sigmoid(self.beta_logit) * mask), mask


class BSD(nn.Module):
    """Scale maps (fine -> coarse) [B, C, H_s, W_s] -> image embedding [B, D] and the salience maps."""

    def __init__(
        self,
        num_scales: int,
        width: int,
        embed_dim: int,
        suppression_init: float,
        dropout: float,
        *,
        direction: str = "chain",
        suppression: str = "spatial",
        fusion: str = "concat",
        scale_heads: bool = False,
    ) -> None:
        super().__init__()
        if num_scales < 2:
            raise ValueError("BSD needs at least two scales")
        for name, value, allowed in (
            ("direction", direction, DIRECTIONS),
            ("suppression", suppression, SUPPRESSIONS),
            ("fusion", fusion, FUSIONS),
        ):
            if value not in allowed:
                raise ValueError(f"BSD {name} {value!r}: must be one of {allowed}")
        self.direction, self.fusion = direction, fusion
        unit = SGS if suppression == "spatial" else ContentSGS
        # Module creation order is the RNG order: the default (chain) keeps the original one exactly.
        if direction == "chain":
            self.sfe_f2c = nn.ModuleList(SFE(width) for _ in range(num_scales))
            self.sfe_c2f = nn.ModuleList(SFE(width) for _ in range(num_scales))
            self.sgs_f2c = nn.ModuleList(unit(suppression_init) for _ in range(num_scales - 1))
            self.sgs_c2f = nn.ModuleList(unit(suppression_init) for _ in range(num_scales - 1))
        else:
            self.sfe_extract = nn.ModuleList(SFE(width) for _ in range(num_scales))
            self.sfe_residual = nn.ModuleList(SFE(width) for _ in range(num_scales))
            self.sgs_parallel = nn.ModuleList(unit(suppression_init) for _ in range(num_scales))
        self.num_clues = 2 * num_scales
        self.norm = nn.LayerNorm(width)
        self.fuse = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_clues * width, embed_dim))
        if fusion == "gate":  # zero init: a uniform gate, i.e. exactly concatenation + linear at the start
            self.gate_weight = nn.Parameter(torch.zeros(self.num_clues, width))
            self.gate_bias = nn.Parameter(torch.zeros(self.num_clues))
        self.scale_heads = (
            nn.ModuleList(nn.Linear(width, embed_dim) for _ in range(self.num_clues)) if scale_heads else None
        )

    @staticmethod
    def _pass(maps: list[torch.Tensor], sfe: nn.ModuleList, sgs: nn.ModuleList):
        clues, masks = [], []
        prev = prev_f = None
        for i, x in enumerate(maps):
            if prev is not None:
                x, mask = sgs[i - 1](x, prev, prev_f)
                masks.append(mask)
            prev, f = sfe[i](x)
            prev_f = f
            clues.append(f)
        return clues, masks

    def _parallel(self, maps: list[torch.Tensor]):
        """Extraction on every raw scale, then each scale suppressed by all the others at once (soft OR)."""
        extracted = [sfe(x) for sfe, x in zip(self.sfe_extract, maps, strict=True)]  # (z_r, f_r)
        residual, masks = [], []
        for s, x in enumerate(maps):
            unit = self.sgs_parallel[s]
            keep = None  # prod_{r != s} (1 - M_{r -> s})
            for r, (z, f) in enumerate(extracted):
                if r != s:
                    m = 1 - unit.mask(x, z, f)
                    keep = m if keep is None else keep * m
            mask = 1 - keep  # [B, 1, H_s, W_s]
            masks.append(mask)
            _, f = self.sfe_residual[s](x * (1 - torch.sigmoid(unit.beta_logit) * mask))
            residual.append(f)
        return [f for _, f in extracted] + residual, masks

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Also returns the suppression masks applied and the normalised clues [B, C] (one per clue).

        chain: masks_f2c (applied to scales 2..S), masks_c2f (S-1..1); parallel: masks (applied to 1..S)."""
        if self.direction == "chain":
            f2c, masks_f2c = self._pass(maps, self.sfe_f2c, self.sgs_f2c)
            c2f, masks_c2f = self._pass(maps[::-1], self.sfe_c2f, self.sgs_c2f)
            raw, aux = f2c + c2f[::-1], {"masks_f2c": masks_f2c, "masks_c2f": masks_c2f}
        else:
            raw, masks = self._parallel(maps)
            aux = {"masks": masks}
        normed = [self.norm(c) for c in raw]
        aux["clues"] = normed
        if self.fusion == "gate":
            h = torch.stack(normed, dim=1)  # [B, K, C]
            gate = torch.softmax((h * self.gate_weight).sum(-1) + self.gate_bias, dim=-1)  # [B, K]
            aux["gate"] = gate
            clues = (h * (self.num_clues * gate).unsqueeze(-1)).flatten(1)  # [B, K * C]
        else:
            clues = torch.cat(normed, dim=-1)  # [B, 2 * S * C]
        return self.fuse(clues), aux

    def scale_embeddings(self, clues: list[torch.Tensor]) -> list[torch.Tensor]:
        """One L2-normalised embedding [B, D] per clue (needs `scale_heads=True`)."""
        if self.scale_heads is None:
            raise RuntimeError("BSD was built without scale heads (model.bsd_cfg.scale_loss_weight = 0)")
        return [F.normalize(head(c).float(), dim=-1) for head, c in zip(self.scale_heads, clues, strict=True)]


class GlobalPoolHead(nn.Module):
    """BSD switched off: global average pooling of the coarsest scale, then a linear map (VSE++ image head)."""

    def __init__(self, width: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.fuse = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, embed_dim))

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return self.fuse(maps[-1].mean(dim=(2, 3))), {}
