"""The nightly re-index over a growing, changing scene archive (issue 15 item 4): `reindex-archive` with
`tile_dest` on a STAC catalog, on a real Prefect server and a local Ray; and the grouping that makes a re-tiled
scene's rows change in one store commit, on a real store."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
from affine import Affine

from pipelines.embed.groups import StagedGroups
from pipelines.store.reader import EmbeddingStore
from pipelines.store.writer import VersionWriter, replacement_token
from tests.store_data import committed_version, unit_tables

# Three small UTM scenes far apart, 512 px of 30 m: 4 chips of 256 px each, 2 chips per shard (2 shards a scene).
PLACES = {
    "alpha": (32633, 400000.0, 5800000.0),
    "bravo": (32618, 500000.0, 4500000.0),
    "charlie": (32755, 300000.0, 6200000.0),
}


def _scene(folder, name: str, seed: int):
    from tests.tile_support import texture, write_raster

    epsg, x0, y0 = PLACES[name]
    return write_raster(
        folder / f"{name}.tif",
        texture(3, 512, 512, seed=seed),
        crs=f"EPSG:{epsg}",
        transform=Affine(30.0, 0, x0, 0, -30.0, y0),
    )


def _catalog(root, scenes: dict[str, tuple]):
    """A STAC catalog of `scenes` ({name: (tif path, cloud cover)}), rewritten in place."""
    import shutil

    from tests.tile_support import save_catalog, stac_item

    if root.exists():
        shutil.rmtree(root)
    items = [stac_item(n, str(p), props={"eo:cloud_cover": cc}) for n, (p, cc) in sorted(scenes.items())]
    return save_catalog(root, items)


def _rows(store_url: str):
    """(units by id, keys by scene, the rows) of the store's latest snapshot."""
    store = EmbeddingStore(store_url)
    snap = store.snapshot()
    table = snap.read_table(columns=["key", "scene_id", "cloud_cover"])
    return (
        store.manifest(snap.model_id).unit_map(),
        {
            scene: sorted(pc.filter(table, pc.equal(table["scene_id"], scene))["key"].to_pylist())
            for scene in set(table["scene_id"].to_pylist())
        },
        table,
    )


@pytest.mark.integration
def test_nightly_reindex_over_a_catalog_adds_new_scenes_replaces_changed_ones_and_drops_gone_ones(
    prefect_server, ray_local, tmp_path
):
    from flows.reindex import reindex_archive
    from tests.embed_helpers import make_tiny_checkpoint

    scenes_dir, stac = tmp_path / "scenes", tmp_path / "stac"
    a, b = _scene(scenes_dir, "alpha", 1), _scene(scenes_dir, "bravo", 2)
    catalog = _catalog(stac, {"alpha": (a, 10.0), "bravo": (b, 20.0)})
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt", ["fields", "a town"])
    chips, store = str(tmp_path / "chips"), str(tmp_path / "store")

    def nightly():
        state = reindex_archive(
            str(catalog),
            store,
            str(ckpt),
            captions=False,
            commit_every_s=0.0,  # commit after every batch: a scene's rows must still change in one commit
            tile_dest=chips,
            tile_options={"chip_size": 256, "maxcount": 2},
            return_state=True,
        )
        assert state.is_completed(), state
        return state.result()

    first = nightly()
    assert (first["new_units"], first["new_images"], first["scenes_tiled"]) == (4, 8, 2)
    units1, rows1, _ = _rows(store)
    assert {s: len(k) for s, k in rows1.items()} == {"alpha": 4, "bravo": 4}

    # The catalog gains charlie; bravo's pixels and its item change (re-tiled into new shard paths).
    c = _scene(scenes_dir, "charlie", 3)
    _scene(scenes_dir, "bravo", 7)
    catalog = _catalog(stac, {"alpha": (a, 10.0), "bravo": (b, 55.0), "charlie": (c, 30.0)})
    second = nightly()
    assert (second["scenes_tiled"], second["new_units"], second["new_images"]) == (2, 4, 8)
    assert second["removed_units"] == 2 and second["failed_units"] == 0
    units2, rows2, table2 = _rows(store)
    alpha = {u for u in units1 if "/alpha-" in u}
    # alpha untouched: the same entries, committed at the same time
    assert len(alpha) == 2 and {u: units2[u] for u in alpha} == {u: units1[u] for u in alpha}
    old_bravo = {u for u in units1 if "/bravo-" in u}
    new_bravo = {u for u in units2 if "/bravo-" in u}
    assert len(new_bravo) == 2 and not (old_bravo & new_bravo)
    assert rows2 == {"alpha": rows1["alpha"], "bravo": rows1["bravo"], "charlie": rows2["charlie"]}
    assert len(rows2["charlie"]) == 4 and len(table2) == 12  # bravo's rows once, not twice
    bravo_cc = pc.filter(table2, pc.equal(table2["scene_id"], "bravo"))["cloud_cover"].to_pylist()
    assert bravo_cc == [55.0] * 4

    # alpha leaves the catalog: its rows leave the store; nothing is embedded.
    _catalog(stac, {"bravo": (b, 55.0), "charlie": (c, 30.0)})
    third = nightly()
    assert (third["new_units"], third["removed_units"]) == (0, 2)
    units3, rows3, _ = _rows(store)
    assert rows3 == {"bravo": rows2["bravo"], "charlie": rows2["charlie"]}
    assert {u: units3[u] for u in new_bravo} == {u: units2[u] for u in new_bravo}


def test_a_scene_is_staged_whole_with_its_old_shards_removal_and_a_failed_shard_holds_it_back(tmp_path):
    store, mid = committed_version(str(tmp_path / "store"), "groups", {"chips/s/shard-000000.tar": (3, 1)})
    model = {"dim": 16, "dtype": "float32"}
    old = store.manifest(mid).unit_map()["chips/s/shard-000000.tar"]
    gone = [{"id": old["id"], "group": "s", "replaces": replacement_token(old)}]
    todo = [{"id": f"chips/s/shard-00000{i}.tar", "group": "s"} for i in (1, 2)]

    writer = VersionWriter(store, mid, model)
    groups = StagedGroups.plan(writer, todo, gone)
    assert groups.finished(todo[0], {"id": todo[0]["id"]}, unit_tables(mid, 2, 2)) == []
    assert writer.commit() == 0  # half a scene is never committed
    assert sorted(store.manifest(mid).unit_map()) == [old["id"]]
    staged = groups.finished(todo[1], {"id": todo[1]["id"]}, unit_tables(mid, 2, 3))
    assert [u["id"] for u, _, _ in staged] == [t["id"] for t in todo]
    gen = store.manifest(mid).generation
    assert writer.commit() == 3 and store.manifest(mid).generation == gen + 1
    assert sorted(store.manifest(mid).unit_map()) == [t["id"] for t in todo]
    writer.close()

    # A scene whose second shard fails: its first shard is not committed, and both are reported.
    writer = VersionWriter(store, mid, model)
    todo2 = [{"id": f"chips/t/shard-00000{i}.tar", "group": "t"} for i in (0, 1)]
    groups = StagedGroups.plan(writer, todo2, [])
    groups.finished(todo2[0], {"id": todo2[0]["id"]}, unit_tables(mid, 2, 4))
    failed = groups.unit_failed(todo2[1], "cut short")
    assert [f["unit"] for f in failed] == [todo2[1]["id"], todo2[0]["id"]]
    assert "same scene failed" in failed[1]["reason"] and groups.unfinished() == []
    assert writer.commit() == 0 and not any("/t/" in u for u in store.manifest(mid).unit_map())
    writer.close()


def test_tile_options_of_the_flow_are_checked_with_a_one_line_reason():
    from flows.reindex import TileOptionsError, scene_tile_options
    from pipelines.embed.options import EmbedOptions

    embed = EmbedOptions(storage_options={"anon": False})
    opts = scene_tile_options({"chip_size": 128}, embed)
    assert (opts.chip_size, opts.storage_options, opts.progress) == (128, {"anon": False}, False)
    with pytest.raises(TileOptionsError, match=r"^tile_options: unknown option\(s\) chipsize$"):
        scene_tile_options({"chipsize": 128}, embed)
    with pytest.raises(TileOptionsError, match="^tile_options: "):
        scene_tile_options({"max_nodata": 7.0}, embed)
