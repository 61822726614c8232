"""Prefect flow `reindex-archive`: embed what is new in the archive into the embedding store (nightly).

Thin on purpose: one task runs `pipelines.embed.job.embed_archive` (a Ray Data job; incremental, so a nightly
run embeds only shards committed since the last one; with `build_ann` it also rebuilds the ANN index), and
the flow publishes what it did as a markdown artifact (`reindex-archive-report`). Its parameters are
`EmbedOptions`' fields plus the three URLs.

Over a growing scene archive (a GeoTIFF/COG folder, URL list or STAC catalog as `archive_url`), `tile_dest`
names where its chips go: the flow first tiles what is new or changed there (the `tile` task of `tile-archive`,
`tile_options` being `TileOptions` fields), then embeds the chips. A changed scene's old rows leave the store
version in the commit that adds its new ones; a scene gone from the catalog leaves with its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retries import retry_on_storage_error
from flows.tile import tile_task
from pipelines.embed.job import embed_archive
from pipelines.embed.options import EmbedOptions
from pipelines.errors import PipelineError
from pipelines.options import REQUIRED, flat_parameters
from pipelines.tile.options import TileOptions


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
        f"| changed units replaced | {len(report.get('replaced_units') or [])} |",
        f"| units gone from the archive, removed | {len(report.get('removed_units') or [])} |",
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


class TileOptionsError(PipelineError, ValueError):
    """`tile_options` names something `TileOptions` does not have, or a value it refuses."""


def scene_tile_options(tile_options: dict[str, Any] | None, embed: EmbedOptions) -> TileOptions:
    """`TileOptions` from the flow's `tile_options` dict; storage options default to the embedding run's."""
    given = dict(tile_options or {})
    known = {f.name for f in dataclasses.fields(TileOptions)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TileOptionsError(f"tile_options: unknown option(s) {', '.join(unknown)}")
    given.setdefault("storage_options", dict(embed.storage_options))
    given.setdefault("workers", 1)
    try:
        return TileOptions(**{**given, "progress": False})
    except (TypeError, ValueError) as exc:
        raise TileOptionsError(f"tile_options: {exc}") from None


@flow(name="reindex-archive", log_prints=True)
@flat_parameters(
    EmbedOptions,
    defaults={"captions": True},
    extra={
        "archive_url": (str, REQUIRED),
        "store_url": (str, REQUIRED),
        "checkpoint_url": (str, REQUIRED),
        "tile_dest": (str | None, None),
        "tile_options": (dict[str, Any] | None, None),
    },
)
def reindex_archive(
    options: EmbedOptions,
    archive_url: str,
    store_url: str,
    checkpoint_url: str,
    tile_dest: str | None = None,
    tile_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed the archive's new shards/images with the checkpoint; returns (and publishes) the counts.

    With `tile_dest`, `archive_url` is a scene source (GeoTIFF/COG folder, URL list, STAC catalog): its new and
    changed scenes are tiled into `tile_dest` first, and the chips there are what is embedded.
    Fails (after publishing the report) when some unit could not be read: what was committed stays, and the
    next run retries only the rest.
    """
    logger = get_run_logger()
    options = dataclasses.replace(options, progress=False)  # a flow run logs; it has no terminal
    tiled = None
    if tile_dest:
        tiled = tile_task(archive_url, tile_dest, scene_tile_options(tile_options, options))
        archive_url = tile_dest
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
        "replaced_units": len(report["replaced_units"]),
        "removed_units": len(report["removed_units"]),
        "scenes_tiled": tiled["scenes_tiled"] if tiled else None,
        "chips": tiled["chips"] if tiled else None,
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
