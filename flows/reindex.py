"""Prefect flow `reindex-archive`: embed what is new in the archive into the embedding store (nightly).

Thin on purpose: one task runs `pipelines.embed.job.embed_archive` (a Ray Data job; incremental, so a nightly
run embeds only shards committed since the last one; with `build_ann` it also rebuilds the ANN index), and
the flow publishes what it did as a markdown artifact (`reindex-archive-report`). Its parameters are
`EmbedOptions`' fields plus the three URLs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retries import retry_on_storage_error
from pipelines.embed.job import embed_archive
from pipelines.embed.options import EmbedOptions
from pipelines.options import REQUIRED, flat_parameters


@task(
    name="embed-new-units",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[30, 120],
    retry_condition_fn=retry_on_storage_error,
)
def embed_task(
    archive_url: str, store_url: str, checkpoint_url: str, options: EmbedOptions
) -> dict[str, Any]:
    logger = get_run_logger()
    report = embed_archive(archive_url, store_url, checkpoint_url, options)
    logger.info("%s", report.summary())
    for b in report.bad[:50]:
        logger.warning("bad sample skipped: %s: %s", b["key"], b["reason"])
    return report.to_json()


def ann_meta(store_url: str, model_id: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The ANN index the embedding run (re)built, for the report; None when there is none."""
    from pipelines.search.ann import load_ann
    from pipelines.store.reader import EmbeddingStore

    index = load_ann(EmbeddingStore(store_url, storage_options).snapshot(model_id))
    return index.meta if index is not None else None


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
@flat_parameters(
    EmbedOptions,
    defaults={"captions": True},
    extra={"archive_url": (str, REQUIRED), "store_url": (str, REQUIRED), "checkpoint_url": (str, REQUIRED)},
)
def reindex_archive(
    options: EmbedOptions, archive_url: str, store_url: str, checkpoint_url: str
) -> dict[str, Any]:
    """Embed the archive's new shards/images with the checkpoint; returns (and publishes) the counts.

    Fails (after publishing the report) when some unit could not be read: what was committed stays, and the
    next run retries only the rest.
    """
    logger = get_run_logger()
    options = dataclasses.replace(options, progress=False)  # a flow run logs; it has no terminal
    report = embed_task(archive_url, store_url, checkpoint_url, options)
    ann = None
    if options.build_ann and report["images"]:
        ann = ann_meta(store_url, report["model_id"], options.store_options or options.storage_options)
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
