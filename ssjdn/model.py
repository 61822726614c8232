"""SSJDN: image encoder (+ BSD) and text encoder (+ LSD) mapped into one L2-normalised joint space.

`build_model(cfg, tokenizer=None, pretrained=True) -> SSJDN`
  encode_image(pixels [B, 3, H, W]) -> [B, D] L2-normalised
  encode_text(tokens {input_ids, attention_mask} [B, L]) -> [B, D] L2-normalised
  forward(batch) -> {"loss", "loss_retrieval", "loss_lsd"?, "loss_scale"?, "kappa_mean"?, ...} (scalar tensors)
Switches: cfg.model.bsd (+ the BSD variants in cfg.model.bsd_cfg), cfg.model.lsd, cfg.loss.name. A switched-off
unit is not built at all.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ssjdn.bsd import BSD, GlobalPoolHead
from ssjdn.image_encoder import ImageEncoder
from ssjdn.losses import (
    infonce_loss,
    same_item_mask,
    semantic_agreement,
    stl_infonce_loss,
    stl_loss,
    triplet_loss,
)
from ssjdn.lsd import LSD, lsd_loss
from ssjdn.text_encoder import build_text_encoder
from ssjdn.tokenization import resolve_text_name


class SSJDN(nn.Module):
    def __init__(self, cfg, *, vocab_size: int | None = None, pretrained: bool = True) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.image = ImageEncoder(cfg, pretrained=pretrained)
        n_scales = self.image.num_scales
        if m.bsd:
            b = m.bsd_cfg
            self.image_head = BSD(
                n_scales,
                m.width,
                m.embed_dim,
                b.suppression_init,
                m.dropout,
                direction=b.direction,
                suppression=b.suppression,
                fusion=b.fusion,
                scale_heads=b.scale_loss_weight > 0,
            )
        else:
            self.image_head = GlobalPoolHead(m.width, m.embed_dim, m.dropout)
        self.text = build_text_encoder(cfg, vocab_size=vocab_size, pretrained=pretrained)
        self.lsd = (
            LSD(m.lsd_cfg.num_classes, m.width, m.embed_dim, m.lsd_cfg.heads, n_scales) if m.lsd else None
        )

    # --- encoders -------------------------------------------------------------------------------------------
    def _image(
        self, pixels: torch.Tensor, aux: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        maps = self.image(pixels)
        emb, head_aux = self.image_head(maps)
        if aux is not None:
            aux.update(head_aux)
        logits = None
        if self.lsd is not None:
            semantic, logits = self.lsd.image(maps)
            emb = emb + semantic
        return F.normalize(emb.float(), dim=-1), logits

    def _text(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.text(tokens)
        emb, logits = feats.pooled, None
        if self.lsd is not None:
            semantic, logits = self.lsd.text(feats.tokens, feats.mask)
            emb = emb + semantic
        return F.normalize(emb.float(), dim=-1), logits

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._image(pixels)[0]

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._text(tokens)[0]

    # --- training objective ------------------------------------------------------------------------------------
    def _retrieval_loss(self, sim, agreement, ignore) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, kappa or weight [B, B] for logging, or None) of the configured retrieval loss on sim [B, B]."""
        loss_cfg = self.cfg.loss
        if loss_cfg.name == "infonce":
            return infonce_loss(sim, loss_cfg.temperature, ignore), None
        if loss_cfg.name == "triplet":
            return triplet_loss(sim, loss_cfg.margin, loss_cfg.variant, ignore), None
        if loss_cfg.name == "stl_nce":
            loss, weight = stl_infonce_loss(sim, agreement, loss_cfg.temperature, loss_cfg.stl.relief, ignore)
            return loss, 1 - weight  # the relief 1 - w (0 on the diagonal), logged like STL's kappa
        return stl_loss(sim, agreement, loss_cfg.margin, loss_cfg.stl.relief, loss_cfg.variant, ignore)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        aux: dict = {}
        img, img_logits = self._image(batch["pixels"], aux)
        txt, txt_logits = self._text(batch["tokens"])
        n = img.shape[0]
        labels = batch.get("labels")
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.long, device=img.device)
        key_ids = batch.get("key_ids")
        ignore = same_item_mask(key_ids) if key_ids is not None else None
        sim = img @ txt.T  # [B, B] cosine similarity
        loss_cfg = self.cfg.loss
        out: dict[str, torch.Tensor] = {}
        agreement = None
        if loss_cfg.name in ("stl", "stl_nce"):
            post_i = torch.softmax(img_logits.float(), -1) if img_logits is not None else None
            post_t = torch.softmax(txt_logits.float(), -1) if txt_logits is not None else None
            agreement = semantic_agreement(labels, post_i, post_t, loss_cfg.stl.agreement)
        retrieval, kappa = self._retrieval_loss(sim, agreement, ignore)
        if kappa is not None:
            out["kappa_mean"] = kappa.detach().mean()
        out["loss_retrieval"] = retrieval
        loss = retrieval
        scale_w = self.cfg.model.bsd_cfg.scale_loss_weight
        if self.cfg.model.bsd and scale_w > 0:
            # Each scale clue retrieves on its own: the same loss on its own embedding against the text's.
            per_clue = [
                self._retrieval_loss(e @ txt.T, agreement, ignore)[0]
                for e in self.image_head.scale_embeddings(aux["clues"])
            ]
            scale_loss = torch.stack(per_clue).mean()
            out["loss_scale"] = scale_loss
            loss = loss + scale_w * scale_loss
        if self.lsd is not None:
            sem = lsd_loss(img_logits, txt_logits, labels)
            out["loss_lsd"] = sem
            loss = loss + loss_cfg.lsd_weight * sem
            known = labels >= 0
            if bool(known.any()):
                out["acc_image"] = (img_logits[known].argmax(-1) == labels[known]).float().mean()
                out["acc_text"] = (txt_logits[known].argmax(-1) == labels[known]).float().mean()
        out["loss"] = loss
        return out


def build_model(cfg, tokenizer=None, *, pretrained: bool = True) -> SSJDN:
    """Build SSJDN for `cfg`. `tokenizer` gives the vocabulary size of the GRU encoder.

    `pretrained=False` builds the same architecture without loading pretrained weights (use it before loading a
    checkpoint). The returned model's `cfg` holds the resolved text model name (`default` -> a concrete name),
    which is what checkpoints record.
    """
    cfg = copy.deepcopy(cfg)
    cfg.model.text.name = resolve_text_name(cfg.model.text.name)
    if cfg.model.lsd and cfg.model.lsd_cfg.num_classes < 2:
        raise ValueError(
            "model.lsd is on but model.lsd_cfg.num_classes is not set: pass the dataset's class count "
            "(overrides={'model.lsd_cfg.num_classes': len(dataset.classes)}) or switch LSD off"
        )
    vocab_size = getattr(tokenizer, "vocab_size", None) if cfg.model.text.kind == "gru" else None
    return SSJDN(cfg, vocab_size=vocab_size, pretrained=pretrained)
