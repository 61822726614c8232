"""The demo's outputs a person looks at: the results table, the training curve (PNG) and `report.html`."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pipelines.search.results import QueryResult

COLUMNS = [
    ("i2t_r1", "I→T R@1"),
    ("i2t_r5", "I→T R@5"),
    ("i2t_r10", "I→T R@10"),
    ("t2i_r1", "T→I R@1"),
    ("t2i_r5", "T→I R@5"),
    ("t2i_r10", "T→I R@10"),
    ("mr", "mR"),
    ("cls_mr", "class-level mR"),
]


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "–" if value is None else f"{value:.2f}"


def results_markdown(rows: dict[str, dict[str, Any]], title: str) -> str:
    """A Markdown table: one line per model (trained, untrained, chance), percent recall."""
    head = "| model | " + " | ".join(name for _, name in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [f"### {title}", "", head, sep]
    lines += [f"| {name} | " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


def results_html(rows: dict[str, dict[str, Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(name)}</th>" for _, name in COLUMNS)
    body = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{_cell(r, k)}</td>" for k, _ in COLUMNS) + "</tr>"
        for name, r in rows.items()
    )
    return f"<table class='results'><tr><th>model</th>{head}</tr>{body}</table>"


def plot_training_curve(history: list[dict[str, Any]], split: str, path: str | Path, *, title: str) -> Path:
    """Training loss and `split` mR per epoch (epoch 0 = before training) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    evals = [(r["epoch"], r[split]["mr"]) for r in history if isinstance(r.get(split), dict)]
    losses = [(r["epoch"], r["train"]["loss"]) for r in history if isinstance(r.get("train"), dict)]
    fig, ax_mr = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    if evals:
        ax_mr.plot(*zip(*evals), "o-", color="tab:blue", label=f"{split} mR (%)")
    ax_mr.set_xlabel("epoch (0 = before training)")
    ax_mr.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_mr.set_ylabel(f"{split} mR (%)", color="tab:blue")
    if losses:
        ax_loss = ax_mr.twinx()
        ax_loss.plot(*zip(*losses), "s--", color="tab:red", label="train loss")
        ax_loss.set_ylabel("train loss", color="tab:red")
    ax_mr.set_title(title, fontsize=10)
    ax_mr.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _query_section(
    result: QueryResult, images: dict[str, dict[str, Any]], heading: str, query_thumb: str | None
) -> str:
    from pipelines.search.page import render_hits

    esc = html.escape
    thumb = f"<img class='query' src='{query_thumb}' alt='query image'>" if query_thumb else ""
    return (
        f"<section><h3>{esc(heading)}</h3>{thumb}"
        f"<p class='meta'>{_search_meta(result)}</p>{render_hits(result.hits, images)}</section>"
    )


def _search_meta(result: QueryResult) -> str:
    return f"{result.mode} search over model {html.escape(result.model_id[:12])} in {result.seconds * 1000:.1f} ms"


def _geo_section(geo: dict[str, Any], storage_options: dict[str, Any] | None) -> str:
    """Per geo query: its heading and filter, a link to its GeoJSON file, the hits' footprints drawn on their
    scenes' overviews (pipelines.search.page, as `ssjdn query --html` draws them; offline) and the hits."""
    from pipelines.search.page import fetch_images, fetch_scene_maps, render_hits, render_maps

    esc = html.escape
    sections = []
    for q in geo["queries"]:
        result = q["result"]
        images = fetch_images(sorted({h.source for h in result.hits}), storage_options)
        maps = fetch_scene_maps(result.hits, images, storage_options)
        link = f"<a class='geojson' href='{esc(q['geojson'])}'>{esc(q['geojson'])}</a>"
        hits = render_hits(result.hits, images, maps) if result.hits else "<p>no hits</p>"
        sections.append(
            f"<section class='geo'><h3>{esc(q['heading'])}</h3><p class='meta'>filter <code>{esc(q['filter'])}"
            f"</code> · {len(result.hits)} hit(s) · {_search_meta(result)} · GeoJSON: {link}</p>"
            f"{render_maps(maps)}{hits}</section>"
        )
    cls = "synthetic" if geo.get("synthetic") else "meta"
    return (
        f"<h2 id='geo'>Geo queries over tiled scenes (top {geo.get('k', 5)})</h2>"
        f"<p class='{cls}'>{esc(geo['label'])}</p><p class='meta'>{esc(geo.get('note', ''))}</p>"
        f"{''.join(sections)}"
    )


def render_report(
    *,
    title: str,
    data_label: str,
    synthetic: bool,
    results: dict[str, dict[str, Any]],
    curve_png: str | None,
    queries: list[dict[str, Any]],
    summary: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
    geo: dict[str, Any] | None = None,
) -> str:
    """The report page. `queries`: [{"heading", "result": QueryResult, "query_thumb": data URI | None}].
    `geo` (optional): {"label", "synthetic", "note", "k", "queries": [{"heading", "filter", "result" (hits with
    footprints), "geojson": file name beside the page}]}, drawn as the geo section with footprint maps."""
    from pipelines.search.page import MAP_STYLE, PAGE_STYLE, fetch_images

    esc = html.escape
    sources = sorted({h.source for q in queries for h in q["result"].hits})
    images = fetch_images(sources, storage_options)
    banner = (
        f"<p class='synthetic'>{esc(data_label)}</p>"
        if synthetic
        else f"<p class='meta'>{esc(data_label)}</p>"
    )
    curve = f"<img class='curve' src='{esc(curve_png)}' alt='training curve'>" if curve_png else ""
    facts = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in summary.items())
    sections = "".join(
        _query_section(q["result"], images, q["heading"], q.get("query_thumb")) for q in queries
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{PAGE_STYLE}{MAP_STYLE if geo else ''}"
        ".synthetic{background:#fde68a;padding:.5em;font-weight:bold}.results td,.results th{padding:2px 8px;"
        "text-align:right;border-bottom:1px solid #ddd}.query{width:192px;border:3px solid #2563eb}"
        "</style></head><body>"
        f"<h1>{esc(title)}</h1>{banner}<h2>Test-split retrieval (percent)</h2>{results_html(results)}"
        f"<h2>Training</h2>{curve}<ul>{facts}</ul><h2>Sample queries (top 5)</h2>{sections}"
        f"{_geo_section(geo, storage_options) if geo else ''}</body></html>"
    )
