"""Building blocks of the end-to-end demo (`flows/demo.py` strings them together as one Prefect flow).

Each function does one stage's work that no other pipeline module already does: choosing the data, evaluating
a checkpoint (or the untrained model) on a split read back from the shards, the chance level, and picking the
sample queries. Sharding, training, embedding and querying are the regular pipeline jobs.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REAL_DATA_ENV = "SSJDN_DEMO_DATA"
SYNTHETIC_NOTE = "SYNTHETIC DATA (procedurally generated scenes and captions, not real imagery)"


@dataclass(frozen=True)
class DemoData:
    path: str
    synthetic: bool

    @property
    def label(self) -> str:
        return SYNTHETIC_NOTE if self.synthetic else f"real data: {self.path}"


def shared_data_dirs() -> list[Path]:
    """The shared data folders the demo looks in: `../shared/data` of the working directory and of the checkout."""
    repo = Path(__file__).resolve().parents[2]
    return [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]


def _real_data_candidates() -> list[Path]:
    out = [Path(os.environ[REAL_DATA_ENV])] if os.environ.get(REAL_DATA_ENV) else []
    return out + [d / "ucm-captions" for d in shared_data_dirs()]


def resolve_data(data: str | None, out_dir: str | os.PathLike) -> DemoData:
    """The dataset the demo runs on: `data` if given, else the real UCM-Captions beside the checkout, else (or
    when `data` is "synthetic") a generated synthetic dataset under `out_dir`, labelled as such in every output."""
    if data == "synthetic":
        return _synthetic(out_dir)
    if data:
        if not Path(data).exists():
            raise FileNotFoundError(f"--data {data}: no such dataset folder or file")
        return DemoData(str(Path(data).resolve()), synthetic=False)
    for candidate in _real_data_candidates():
        if (candidate / "dataset.json").exists():
            return DemoData(str(candidate.resolve()), synthetic=False)
    log.warning("no real dataset found (looked for %s)", ", ".join(map(str, _real_data_candidates())))
    return _synthetic(out_dir)


def _synthetic(out_dir: str | os.PathLike) -> DemoData:
    from ssjdn.data.synthetic import generate_synthetic

    target = Path(out_dir) / "synthetic-data"
    log.warning("%s: generating it under %s", SYNTHETIC_NOTE, target)
    path = generate_synthetic(target, n_per_class=40, seed=0, size=128)
    return DemoData(str(Path(path).resolve()), synthetic=True)


def shard_size(dataset: str, workers: int, shards_per_worker: int = 4) -> int:
    """Samples per shard so that every training worker streams several train shards (at most 1000)."""
    from ssjdn.data.readers import load_dataset

    n_train = len(load_dataset(dataset).by_split("train"))
    return max(1, min(1000, n_train // (workers * shards_per_worker)))


def chance_metrics(n_images: int, caption_image: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Expected recall of a random ranking, in the same keys and units (percent) as `retrieval_metrics`.

    t2i: the caption's one image is among K of n_images with probability K/n. i2t: at least one of the image's
    c captions among K of the m captions: 1 - C(m-c, K) / C(m, K), averaged over images.
    """
    m = len(caption_image)
    per_image = [0] * n_images
    for i in caption_image:
        per_image[i] += 1
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
        hit = [1.0 - (math.comb(m - c, k) / math.comb(m, k) if m - c >= k else 0.0) for c in per_image]
        out[f"i2t_r{k}"] = 100.0 * sum(hit) / n_images
    out["mr"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks) / (2 * len(ks))
    return out


def load_split_records(shards_url: str, split: str, transform, storage_options: dict[str, Any] | None = None):
    """(key, pixels, captions, class_index) records of one split, read back from the shards (bad ones skipped)."""
    from pipelines.shard.read import open_split
    from pipelines.train.data import decode_eval_item
    from ssjdn.batching import BadItem

    records, bad = [], []
    for sample in open_split(shards_url, split, storage_options=storage_options):
        item = decode_eval_item(sample, transform)
        (bad if isinstance(item, BadItem) else records).append(item)
    for item in bad:
        log.warning("skipped unreadable %s sample %s: %s", split, item.key, item.reason)
    if not records:
        raise ValueError(f"{shards_url}: the {split} split has no readable samples")
    return records


def evaluate_test_split(
    shards_url: str, checkpoint: str, *, split: str = "test", storage_options: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Retrieval metrics on `split` of the shards for the trained checkpoint, for the same architecture before
    training (pretrained text encoder, freshly initialised image side, the config's seed), and for chance."""
    from pipelines.fsio import get_fs
    from ssjdn import engine
    from ssjdn.checkpoint import load_checkpoint, restore_model
    from ssjdn.model import build_model
    from ssjdn.transforms import ImageTransform

    fs, path = get_fs(checkpoint, storage_options)
    with fs.open(path, "rb") as f:
        ckpt = load_checkpoint(f.read())
    model, tokenizer, cfg = restore_model(ckpt)
    records = load_split_records(
        shards_url, split, ImageTransform.from_config(cfg.data, train=False), storage_options
    )
    eval_set = engine.EvalSet.from_records(records, batch_size=cfg.train.eval_batch_size)
    trained = engine.evaluate(model, tokenizer, eval_set)
    engine.seed_everything(cfg.train.seed)
    untrained = engine.evaluate(build_model(cfg, tokenizer, pretrained=True).eval(), tokenizer, eval_set)
    chance = chance_metrics(len(records), [i for _, i in eval_set.captions])
    return {"SSJDN (trained)": trained, "untrained": untrained, "chance": chance}


def pick_queries(
    shards_url: str, split: str = "test", n_text: int = 3, storage_options=None
) -> dict[str, Any]:
    """Sample queries for the report: the first caption of `n_text` test images of different classes (spread over
    the split deterministically), and one test image (its source URI) for the image query."""
    from pipelines.shard.read import open_split

    seen_classes: set[Any] = set()
    texts: list[dict[str, Any]] = []
    image_query = None
    samples = list(open_split(shards_url, split, storage_options=storage_options))
    step = max(1, len(samples) // (n_text * 4))
    for sample in samples[::step]:
        meta = sample["meta"]
        cls = meta.get("class_name")
        if cls in seen_classes or not meta.get("captions"):
            continue
        seen_classes.add(cls)
        entry = {"text": meta["captions"][0], "key": sample["key"], "class": cls}
        if len(texts) < n_text:
            texts.append(entry)
        elif image_query is None:
            image_query = {
                "key": sample["key"],
                "class": cls,
                "image": sample["image"],
                "ext": sample["image_ext"],
            }
            break
    return {"texts": texts, "image": image_query}
