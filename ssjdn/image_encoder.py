"""Image encoder: a transformers ResNet backbone giving several scale maps, each projected to a common width.

pixels [B, 3, H, W] -> list of scale maps X_s [B, W_c, H_s, W_s] (fine to coarse, one per `out_features` stage).
The backbone comes from a hub name or a local directory (`model.image.pretrained: true`) or is built from the
layout in the config with random weights (tests, offline, the CPU configs).
"""

from __future__ import annotations

import torch
from torch import nn


def build_backbone(image_cfg, *, pretrained: bool = True, out_features: list[str] | None = None) -> nn.Module:
    from transformers import AutoBackbone, AutoConfig, ResNetConfig

    out_features = list(out_features or image_cfg.out_features)
    if image_cfg.pretrained:
        # Not AutoBackbone.from_pretrained: in transformers 5 it asks the hub whether the repo exists (fails
        # offline even for a local directory). Resolve the backbone class from the config instead.
        from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

        try:
            hf_cfg = AutoConfig.from_pretrained(image_cfg.name, out_features=out_features)
            backbone_cls = MODEL_FOR_BACKBONE_MAPPING[type(hf_cfg)]
            if pretrained:
                return backbone_cls.from_pretrained(image_cfg.name, config=hf_cfg)
            return backbone_cls(hf_cfg)
        except (OSError, ValueError, KeyError) as exc:
            raise OSError(
                f"could not load image backbone {image_cfg.name!r} ({exc}). Offline? Pass a local directory "
                "(model.image.name=/path/to/resnet) or model.image.pretrained=false for random weights."
            ) from exc
    hf_cfg = ResNetConfig(
        embedding_size=image_cfg.embedding_size,
        hidden_sizes=list(image_cfg.hidden_sizes),
        depths=list(image_cfg.depths),
        layer_type=image_cfg.layer_type,
        out_features=out_features,
    )
    return AutoBackbone.from_config(hf_cfg)


class ImageEncoder(nn.Module):
    def __init__(self, cfg, *, pretrained: bool = True) -> None:
        super().__init__()
        image_cfg = cfg.model.image
        stages = list(image_cfg.out_features)
        if not cfg.model.bsd and not cfg.model.lsd:
            stages = stages[
                -1:
            ]  # the global-pool head reads only the coarsest scale: build no unused projections
        self.backbone = build_backbone(image_cfg, pretrained=pretrained, out_features=stages)
        if image_cfg.freeze:
            self.backbone.requires_grad_(False)
        width = cfg.model.width
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for c in self.backbone.channels
        )

    @property
    def num_scales(self) -> int:
        return len(self.proj)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        maps = self.backbone(pixel_values=pixels).feature_maps
        return [p(m) for p, m in zip(self.proj, maps, strict=True)]
