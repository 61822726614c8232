"""Prefect flow `ssjdn-demo`: the main job end to end on an embedded default.

shard (flow `shard-dataset`) -> train on Ray (flow `train-ssjdn`) -> evaluate on the test split -> embed the
test images and captions (flow `reindex-archive`) -> three text queries and one image query -> geo: tile two
GeoTIFF scenes and embed their chips into the same store version (`reindex-archive` with `tile_dest`), one text
query with a bbox and one near a point, each written as GeoJSON -> report (with the footprint maps).
Local Ray, local Prefect (ephemeral unless PREFECT_API_URL is set) and a local directory as the object store by
default; `store` may be any fsspec URL (s3://...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.reindex import reindex_archive
from flows.shard import shard_dataset_flow
from flows.train import train_ssjdn
from pipelines.fsio import get_fs, is_local
from pipelines.geo.geojson import write_geojson
from pipelines.report import demo_geo, report
from pipelines.report import demo_steps as demo
from pipelines.search.query import QueryOptions
from pipelines.search.searcher import Searcher

STAGES = 7
GEO_K = 5


def _stage(n: int, text: str) -> None:
    get_run_logger().info("[%d/%d] %s", n, STAGES, text)


def _store_url(store: str, *parts: str) -> str:
    base = store if "://" in store else str(Path(store).resolve())
    return "/".join([base.rstrip("/"), *parts])


@task(name="evaluate-test-split", cache_policy=NO_CACHE)
def evaluate_task(shards: str, checkpoint: str) -> dict[str, dict[str, float]]:
    return demo.evaluate_test_split(shards, checkpoint)


@task(name="sample-queries", cache_policy=NO_CACHE)
def queries_task(shards: str, store: str, out_dir: str) -> list[dict[str, Any]]:
    from pipelines.search.page import thumbnail_uri

    picked = demo.pick_queries(shards)
    options = QueryOptions(k=5)
    out = []
    # One searcher for every query: the model and the matrix are loaded once, as an analyst's session does.
    with Searcher(store, options, refresh_s=None) as searcher:
        for q in picked["texts"]:
            result = searcher.search(text=q["text"])
            out.append(
                {
                    "heading": f"text: “{q['text']}” (caption of {q['key']}, class {q['class']})",
                    "result": result,
                }
            )
        if picked["image"]:
            img = picked["image"]
            path = Path(out_dir) / f"query-image.{img['ext']}"
            path.write_bytes(img["image"])
            result = searcher.search(image=str(path))
            out.append(
                {
                    "heading": f"image: {img['key']} (class {img['class']}); the query image itself should rank "
                    "first",
                    "result": result,
                    "query_thumb": thumbnail_uri(img["image"], str(path)),
                }
            )
    return out


@task(name="geo-queries", cache_policy=NO_CACHE)
def geo_queries_task(
    chips: str, scenes: demo_geo.DemoScenes, store: str, out_dir: str
) -> list[dict[str, Any]]:
    """The two geo queries (placed from the tile manifest's scene bboxes) through one `Searcher`, each hit with
    its footprint; each query's hits written to `geo-<kind>.geojson` in `out_dir`."""
    from pipelines.shard.read import read_manifest

    placed = demo_geo.geo_queries(demo_geo.scenes_in_order(read_manifest(chips)["tile"]["scenes"], scenes))
    out = []
    with Searcher(store, QueryOptions(k=GEO_K), refresh_s=None) as searcher:
        for q in placed:
            where = (
                {"bbox": q["bbox"]}
                if q["kind"] == "bbox"
                else {"near": q["near"], "radius_km": q["radius_km"]}
            )
            result = searcher.search(text=q["text"], geometry=True, **where)
            name = f"geo-{q['kind']}.geojson"
            write_geojson(Path(out_dir) / name, [h.feature() for h in result.hits])
            out.append(
                {
                    **q,
                    "heading": f"text: “{q['text']}” with {q['kind']}",
                    "filter": demo_geo.filter_label(q),
                    "result": result,
                    "geojson": name,
                }
            )
    return out


@flow(name="ssjdn-demo", log_prints=True)
def ssjdn_demo(
    data: str | None = None,
    store: str = "./store",
    out: str = "./demo-out",
    epochs: int = 3,
    workers: int = 2,
    config: str = "cpu-small",
    overrides: dict[str, Any] | None = None,
    scenes: str | None = None,
) -> dict[str, Any]:
    """Run shard -> train -> evaluate -> embed -> query -> geo on `data` (default: real UCM-Captions when
    present, else a generated synthetic dataset) and write metrics.json, results.md, training_curve.png,
    report.html and the geo queries' GeoJSON. `scenes`: the folder of cogeo.tif and RGB.byte.tif to tile
    (default: ../shared/data/geotiff when it holds them, whatever `data` is; "synthetic": generated ones)."""
    logger = get_run_logger()
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = demo.resolve_data(data, out_dir)
    logger.info("data: %s", chosen.label)
    name = f"demo-{'synthetic' if chosen.synthetic else Path(chosen.path).name}-{config}"
    shards = _store_url(store, "shards", name)
    runs = _store_url(store, "runs")
    embeddings = _store_url(store, "embeddings")

    _stage(1, f"sharding {chosen.path} -> {shards}")
    shard_summary = shard_dataset_flow(
        dataset=chosen.path, dest=shards, maxcount=demo.shard_size(chosen.path, workers)
    )

    _stage(2, f"training {config} on Ray ({workers} workers, {epochs} epochs) -> {runs}/{name}")
    train = train_ssjdn(
        config=config,
        shards=shards,
        storage=runs,
        workers=workers,
        epochs=epochs,
        name=name,
        overrides=overrides,
    )
    best = f"{train['run']}/best/checkpoint.pt"

    _stage(3, "evaluating the trained and the untrained model on the test split")
    results = evaluate_task(shards, best)
    trained, untrained, chance = results["SSJDN (trained)"], results["untrained"], results["chance"]

    _stage(4, f"embedding the test images and captions -> {embeddings}")
    embedded = reindex_archive(archive_url=shards, store_url=embeddings, checkpoint_url=best, splits=["test"])

    _stage(5, "running three text queries and one image query")
    queries = queries_task(shards, embeddings, str(out_dir))

    chips = _store_url(store, "chips", "demo-geo")
    geo_scenes = demo_geo.resolve_scenes(scenes, out_dir)
    _stage(6, f"geo: tiling {len(geo_scenes.paths)} scenes -> {chips}, embedding the chips, two geo queries")
    logger.info("scenes: %s", geo_scenes.label)
    # The nightly scene re-index in one call: tile what is new into `chips`, embed only the new chips.
    geo_embedded = reindex_archive(
        archive_url=demo_geo.write_scene_list(geo_scenes, out_dir / "geo-scenes.txt"),
        store_url=embeddings,
        checkpoint_url=best,
        tile_dest=chips,
        tile_options=demo_geo.TILE_OPTIONS,
    )
    geo_queries = geo_queries_task(chips, geo_scenes, embeddings, str(out_dir))

    _stage(7, f"writing the report -> {out_dir}")
    fs, path = get_fs(train["metrics"])
    history = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    curve = report.plot_training_curve(
        history,
        train["eval_split"],
        out_dir / "training_curve.png",
        title=f"{config} on {Path(chosen.path).name} ({'SYNTHETIC' if chosen.synthetic else 'real'})",
    )
    title = f"SSJDN demo: {Path(chosen.path).name}" + (" (SYNTHETIC DATA)" if chosen.synthetic else "")
    table_md = report.results_markdown(results, f"{title}: test split, percent")
    (out_dir / "results.md").write_text(
        ("**" + demo.SYNTHETIC_NOTE + "**\n\n" if chosen.synthetic else "") + table_md
    )
    summary = {
        "data": chosen.label,
        "synthetic": chosen.synthetic,
        "shards": shards,
        "shard_samples": shard_summary.get("samples"),
        "run": train["run"],
        "checkpoint": best,
        "epochs": train["epochs"],
        "embeddings": embedded.get("version_url"),
        "test": results,
        "best_val_mr": train.get("best_mr"),
        "geo": {
            "scenes": list(geo_scenes.paths),
            "synthetic_scenes": geo_scenes.synthetic,
            "chips_dest": chips,
            "chips": geo_embedded["chips"],
            "chips_embedded": geo_embedded.get("new_images"),
            "queries": [
                {
                    "kind": q["kind"],
                    "text": q["text"],
                    "filter": q["filter"],
                    **{k: q[k] for k in ("bbox", "near", "radius_km") if k in q},
                    "hits": len(q["result"].hits),
                    "geojson": str(out_dir / q["geojson"]),
                }
                for q in geo_queries
            ],
        },
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    facts = {k: summary[k] for k in ("data", "shards", "run", "checkpoint", "epochs", "embeddings")}
    page = report.render_report(
        title=title,
        data_label=chosen.label,
        synthetic=chosen.synthetic,
        results=results,
        curve_png=curve.name,
        queries=queries,
        summary=facts,
        geo={
            "label": geo_scenes.label,
            "synthetic": geo_scenes.synthetic,
            "k": GEO_K,
            "note": f"{geo_embedded['chips']} chips of {len(geo_scenes.paths)} scenes in {chips}, embedded with the "
            "trained checkpoint into the same store version (the geo filter selects chips only: the test split "
            "has no footprints)",
            "queries": geo_queries,
        },
    )
    (out_dir / "report.html").write_text(page)
    create_markdown_artifact(key="ssjdn-demo-results", markdown=table_md, description=title)
    store_hint = embeddings if not is_local(embeddings) else str(Path(embeddings.split("://")[-1]))
    logger.info(
        "done. test mR %.2f (untrained %.2f, chance %.2f); geo: %d chips, %s hits (%s). Outputs in %s: "
        "report.html, results.md, metrics.json, training_curve.png, %s. Next: open %s, or query the store: "
        'ssjdn query "a runway with planes" --store %s',
        trained["mr"],
        untrained["mr"],
        chance["mr"],
        geo_embedded["chips"],
        " and ".join(str(q["hits"]) for q in summary["geo"]["queries"]),
        " / ".join(q["kind"] for q in summary["geo"]["queries"]),
        out_dir,
        ", ".join(q["geojson"] for q in geo_queries),
        out_dir / "report.html",
        store_hint,
    )
    summary["report"] = str(out_dir / "report.html")
    return summary
