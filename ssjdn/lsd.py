"""Label-supervised Semantic Decoupling (LSD).

Our interpretation (see docs/model.md): K learnable class-semantic embeddings E [K, W] act as queries. Image
regions (all scale maps flattened, plus a learned scale embedding) [B, N, W] or text tokens [B, L, W] are attended
by them (one multi-head cross-attention per branch), giving class-decoupled features C [B, K, W]. A scene
classifier shared by both branches scores each class slot: logits_k = <C_k, w_k> + b_k [B, K]. The posterior
p = softmax(logits) weights the slots into a semantic feature s = sum_k p_k C_k [B, W], which is mapped to the
joint space [B, D] and added to the branch embedding. Cross-entropy trains the classifier on labelled samples only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LSD(nn.Module):
    def __init__(self, num_classes: int, width: int, embed_dim: int, heads: int, num_scales: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"LSD needs at least 2 classes (model.lsd_cfg.num_classes={num_classes})")
        self.num_classes = num_classes
        self.class_embed = nn.Parameter(torch.randn(num_classes, width) * 0.02)  # E [K, W]
        self.scale_embed = nn.Parameter(torch.zeros(num_scales, width))
        self.image_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.text_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.image_norm = nn.LayerNorm(width)
        self.text_norm = nn.LayerNorm(width)
        self.cls_weight = nn.Parameter(torch.randn(num_classes, width) * width**-0.5)
        self.cls_bias = nn.Parameter(torch.zeros(num_classes))
        self.image_fuse = nn.Linear(width, embed_dim)
        self.text_fuse = nn.Linear(width, embed_dim)

    def _decouple(self, tokens, pad_mask, attn, norm, fuse) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.class_embed.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, K, W]
        c, _ = attn(q, tokens, tokens, key_padding_mask=pad_mask, need_weights=False)
        c = norm(c + q)  # class-decoupled features [B, K, W]
        logits = (c * self.cls_weight).sum(-1) + self.cls_bias  # [B, K]
        semantic = (torch.softmax(logits, -1).unsqueeze(-1) * c).sum(1)  # [B, W]
        return fuse(semantic), logits

    def image(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale maps [B, W, H_s, W_s] -> (semantic embedding [B, D], class logits [B, K])."""
        tokens = torch.cat(
            [m.flatten(2).transpose(1, 2) + self.scale_embed[s] for s, m in enumerate(maps)], dim=1
        )  # [B, N, W]
        return self._decouple(tokens, None, self.image_attn, self.image_norm, self.image_fuse)

    def text(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens [B, L, W] with mask [B, L] (true = real token) -> ([B, D], [B, K])."""
        return self._decouple(tokens, ~mask, self.text_attn, self.text_norm, self.text_fuse)


def lsd_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of both branches on labelled samples (label >= 0); unlabelled samples contribute nothing.

    With no labelled sample the result is an exact zero that still belongs to the graph (DDP sees every parameter).
    """
    known = labels >= 0
    if not bool(known.any()):
        return (image_logits.sum() + text_logits.sum()) * 0.0
    y = labels[known]
    return F.cross_entropy(image_logits[known].float(), y) + F.cross_entropy(text_logits[known].float(), y)
