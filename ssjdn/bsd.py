"""Bidirectional Scale Decoupling (BSD): Salience Feature Extraction (SFE) + Salience-Guided Suppression (SGS).

Our interpretation of the paper's abstract (see docs/model.md for the equations):
- SFE on a scale map X [B, C, H, W]: salience logits z = conv1x1(relu(bn(conv3x3(X)))) [B, 1, H, W];
  salient feature f = sum_hw softmax_hw(z) X [B, C].
- SGS at the next scale X' [B, C, H', W']: soft mask S = sigmoid(z + t) of the previous scale (t learnable offset),
  X~' = X' * (1 - beta * resample(S, H' x W')), beta = sigmoid(b) learnable, so the next scale looks at what the
  previous one did not already capture.
- Two passes, fine->coarse and coarse->fine, each with its own SFE units; the 2 x n_scales clues are normalised,
  concatenated and linearly fused into the image embedding [B, D].
`GlobalPoolHead` is the head used when BSD is switched off (VSE++: average pooling of the last stage).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def resample(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a soft mask [B, 1, h, w] to `size`: area averaging when shrinking, bilinear when growing."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(mask, size)
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


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
        self.beta_logit = nn.Parameter(torch.tensor(math.log(init / (1 - init))))
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, prev_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (suppressed X~' [B, C, H', W'], the previous scale's soft salience mask S [B, 1, h, w])."""
        salience = torch.sigmoid(prev_logits + self.offset)
        mask = resample(salience, x.shape[-2:])
        return x * (1 - torch.sigmoid(self.beta_logit) * mask), salience


class BSD(nn.Module):
    """Scale maps (fine -> coarse) [B, C, H_s, W_s] -> image embedding [B, D] and the salience maps."""

    def __init__(
        self, num_scales: int, width: int, embed_dim: int, suppression_init: float, dropout: float
    ) -> None:
        super().__init__()
        if num_scales < 2:
            raise ValueError("BSD needs at least two scales")
        self.sfe_f2c = nn.ModuleList(SFE(width) for _ in range(num_scales))
        self.sfe_c2f = nn.ModuleList(SFE(width) for _ in range(num_scales))
        self.sgs_f2c = nn.ModuleList(SGS(suppression_init) for _ in range(num_scales - 1))
        self.sgs_c2f = nn.ModuleList(SGS(suppression_init) for _ in range(num_scales - 1))
        self.norm = nn.LayerNorm(width)
        self.fuse = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * num_scales * width, embed_dim))

    @staticmethod
    def _pass(maps: list[torch.Tensor], sfe: nn.ModuleList, sgs: nn.ModuleList):
        clues, masks = [], []
        prev = None
        for i, x in enumerate(maps):
            if prev is not None:
                x, mask = sgs[i - 1](x, prev)
                masks.append(mask)
            prev, f = sfe[i](x)
            clues.append(f)
        return clues, masks

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Also returns the suppression masks applied (fine->coarse: to scales 2..S; coarse->fine: S-1..1)."""
        f2c, masks_f2c = self._pass(maps, self.sfe_f2c, self.sgs_f2c)
        c2f, masks_c2f = self._pass(maps[::-1], self.sfe_c2f, self.sgs_c2f)
        clues = torch.cat([self.norm(c) for c in f2c + c2f[::-1]], dim=-1)  # [B, 2 * S * C]
        return self.fuse(clues), {"masks_f2c": masks_f2c, "masks_c2f": masks_c2f}


class GlobalPoolHead(nn.Module):
    """BSD switched off: global average pooling of the coarsest scale, then a linear map (VSE++ image head)."""

    def __init__(self, width: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.fuse = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, embed_dim))

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return self.fuse(maps[-1].mean(dim=(2, 3))), {}
