"""Prefect flow `reindex-archive`: embed what is new in the archive into the embedding store (nightly).

Thin on purpose: one task runs `pipelines.embed.embed_archive` (a Ray Data job; incremental, so a nightly
run embeds only shards committed since the last one), an optional task rebuilds the ANN index, and the
flow publishes what it did as a markdown artifact (`reindex-archive-report`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retries import retry_on_storage_error


@task(
    name="embed-new-units",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[30, 120],
    retry_condition_fn=retry_on_storage_error,
)
def embed_task(archive_url: str, store_url: str, checkpoint_url: str, **options: Any) -> dict[str, Any]:
    from pipelines.embed.job import embed_archive

    logger = get_run_logger()
    report = embed_archive(archive_url, store_url, checkpoint_url, progress=False, **options)
    logger.info("%s", report.summary())
    for b in report.bad[:50]:
        logger.warning("bad sample skipped: %s: %s", b["key"], b["reason"])
    return report.to_json()


@task(name="build-ann-index", cache_policy=NO_CACHE)
def ann_task(store_url: str, model_id: str) -> dict[str, Any]:
    from pipelines.search.ann import build_ann
    from pipelines.store.store import EmbeddingStore

    store = EmbeddingStore(store_url)
    return build_ann(store, store.manifest(model_id)).meta


def report_markdown(report: dict[str, Any], ann: dict[str, Any] | None) -> str:
    lines = [
        "# reindex-archive",
        "",
        "| | |",
        "|---|---|",
        f"| store version | `{report['version_url']}` |",
        f"| model_id | `{report['model_id'][:16]}…` |",
        f"| archive kind | {report['archive_kind']} |",
        f"| new units (shards) embedded | **{report['units_embedded']}** |",
        f"| units already in the store | {report['units_done_before']} |",
        f"| new images | **{report['images']}** |",
        f"| new captions | {report['captions']} |",
        f"| bad samples skipped | {len(report['bad'])} |",
        f"| units failed (retried next run) | {len(report['failed_units'])} |",
        f"| seconds | {report['seconds']:.1f} |",
    ]
    if ann:
        k = ann["recall_k"]
        lines.append(f"| ANN index | {ann['rows']} rows, recall@{k} vs exact {ann[f'recall@{k}']:.3f} |")
    for f in report["failed_units"][:20]:
        lines.append(f"\nfailed: `{f['unit']}`: {f['reason']}")
    return "\n".join(lines) + "\n"


@flow(name="reindex-archive", log_prints=True)
def reindex_archive(
    archive_url: str,
    store_url: str,
    checkpoint_url: str,
    captions: bool = True,
    batch_size: int = 64,
    concurrency: int = 1,
    gpu: bool = False,
    dtype: str = "float32",
    splits: list[str] | None = None,
    build_ann: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Embed the archive's new shards/images with the checkpoint; returns (and publishes) the counts.

    Fails (after publishing the report) when some unit could not be read: what was committed stays, and the
    next run retries only the rest.
    """
    logger = get_run_logger()
    report = embed_task(
        archive_url,
        store_url,
        checkpoint_url,
        captions=captions,
        batch_size=batch_size,
        concurrency=concurrency,
        gpu=gpu,
        dtype=dtype,
        splits=splits,
        ray_address=ray_address,
    )
    ann = ann_task(store_url, report["model_id"]) if build_ann and report["images"] else None
    create_markdown_artifact(
        key="reindex-archive-report",
        markdown=report_markdown(report, ann),
        description=f"{report['units_embedded']} new unit(s), {report['images']} new image(s)",
    )
    summary = {
        "model_id": report["model_id"],
        "version_url": report["version_url"],
        "new_units": report["units_embedded"],
        "new_images": report["images"],
        "new_captions": report["captions"],
        "bad_samples": len(report["bad"]),
        "failed_units": len(report["failed_units"]),
        "ann_recall_at_10": ann.get("recall@10") if ann else None,
    }
    logger.info("reindex-archive: %s", summary)
    if report["failed_units"]:
        raise RuntimeError(
            f"{len(report['failed_units'])} unit(s) could not be embedded: {report['failed_units'][:3]}"
        )
    return summary


if __name__ == "__main__":
    import sys

    print(reindex_archive(*sys.argv[1:4]))
