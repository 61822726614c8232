"""Acceptance run of the embedding store on real data: UCM test split, shards on a moto S3 server, a trained
checkpoint; exactness against the model's direct output, and caption -> image retrieval through the store.

    .venv/bin/python benchmarks/bench_store_retrieval.py --checkpoint runs/cpu-small/best.pt

1. starts a moto S3 server on 127.0.0.1 (`benchmarks.local_s3`), shards ../shared/data/ucm-captions (test split)
   onto it with `ssjdn shard`'s code, and embeds it with `ssjdn embed ... --captions --splits test`;
2. compares every stored image and caption embedding with the model's own output for the same files
   (max |difference|, goal <= 1e-5 in float32);
3. every test caption as a query (`pipelines.query`, the engine of `ssjdn query`, exact search over the
   committed Parquet files): how often its own image is in the top 10 (chance: 10 / number of images), and
   how often an image of the same class is; plus three real `ssjdn query` runs printed as a user sees them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
UCM = REPO.parent / "shared" / "data" / "ucm-captions"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=str(UCM))
    p.add_argument("--split", default="test")
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from benchmarks.local_s3 import local_s3
    from pipelines.embed.job import embed_archive
    from pipelines.encoders import read_checkpoint, restore_encoders
    from pipelines.search.exact import exact_topk
    from pipelines.shard.job import shard_dataset
    from pipelines.store.reader import EmbeddingStore
    from pipelines.store.schema import embeddings_to_numpy
    from ssjdn.data.images import decode_image
    from ssjdn.data.readers import load_dataset
    from ssjdn_cli.main import main as ssjdn

    with local_s3("acceptance") as env:
        endpoint = env["AWS_ENDPOINT_URL"]
        shards, store_url = "s3://acceptance/ucm-shards", "s3://acceptance/store"
        t = time.perf_counter()
        shard_dataset(args.data, shards, splits=[args.split], maxcount=100, progress=False)
        print(f"sharded the {args.split} split to {shards} on {endpoint} in {time.perf_counter() - t:.1f}s")
        report = embed_archive(
            shards, store_url, args.checkpoint, captions=True, splits=[args.split], progress=False
        )
        print(report.summary())

        snapshot = EmbeddingStore(store_url).snapshot(report.model_id)
        images = snapshot.read_table("images").sort_by("key")
        caps = snapshot.read_table("captions").sort_by("key")
        samples = {s.key: s for s in load_dataset(args.data).by_split(args.split)}

        enc = restore_encoders(read_checkpoint(args.checkpoint))
        tf = enc.transform()
        keys = images.column("key").to_pylist()
        direct = np.concatenate(
            [
                enc.encode_pixels(
                    np.stack(
                        [
                            tf(decode_image(Path(samples[k].source).read_bytes(), k)).numpy()
                            for k in keys[i : i + 64]
                        ]
                    )
                )
                for i in range(0, len(keys), 64)
            ]
        )
        img_diff = float(np.abs(embeddings_to_numpy(images.column("embedding")) - direct).max())
        cap_text = caps.column("caption").to_pylist()
        cap_diff = float(
            np.abs(embeddings_to_numpy(caps.column("embedding")) - enc.encode_texts(cap_text)).max()
        )
        exactness = f"max |stored - direct model output|: images {img_diff:.2e}, captions {cap_diff:.2e} (goal <= 1e-5)"
        print(exactness)

        # every test caption as a query against the stored test images
        queries = embeddings_to_numpy(caps.column("embedding"))
        ranked, _ = exact_topk(snapshot, queries, k=args.k)
        key_at = [k for _, b in snapshot.iter_batches("images", ["key"]) for k in b.column("key").to_pylist()]
        cls = dict(zip(images.column("key").to_pylist(), images.column("class").to_pylist()))
        own = caps.column("image_key").to_pylist()
        hit = [own[i] in {key_at[r] for r in ranked[i]} for i in range(len(own))]
        cls_hit = [cls[own[i]] in {cls[key_at[r]] for r in ranked[i]} for i in range(len(own))]
        chance = args.k / len(keys)
        retrieval = (
            f"caption -> image, own image in top {args.k}: {100 * np.mean(hit):.1f}% of {len(own)} captions "
            f"(chance {100 * chance:.1f}%, x{np.mean(hit) / chance:.1f}); an image of the caption's class in "
            f"top {args.k}: {100 * np.mean(cls_hit):.1f}%"
        )
        print(retrieval)

        for text in (cap_text[0], "many planes parked near a terminal", "a river runs through the forest"):
            print(f"\n$ ssjdn query {json.dumps(text)} --store {store_url} -k 5")
            ssjdn(["query", text, "--store", store_url, "-k", "5"])
        out = Path(tempfile.gettempdir()) / "ssjdn-acceptance-hits.html"
        ssjdn(["query", "many planes parked near a terminal", "--store", store_url, "--html", str(out)])
        print(f"\nthumbnail page: {out}")
        print(
            f"\nsummary\n{exactness}\n{retrieval}"
        )  # last: `make bench` takes the closing lines as the headline


if __name__ == "__main__":
    main()
