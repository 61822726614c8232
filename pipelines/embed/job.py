"""`ssjdn embed`: a Ray Data job that embeds an archive with a trained checkpoint into the Parquet store.

    units (shards / image chunks) -> read + decode + preprocess (parallel tasks)
          -> encode (map_batches, callable class on an ActorPoolStrategy: model loaded once per actor, GPU if asked)
          -> driver: rows grouped per unit; a complete unit is staged, then committed (pipelines.store.writer)

A tiled scene's shards are staged together, with the removal of the shards the scene had before it was
re-tiled (pipelines.embed.groups), and a committed unit the archive's manifest no longer lists leaves the store
version (`gone_units`): a nightly run over a growing, changing archive mirrors it in the store.

Every unit ends with a marker row that carries its sample count, so the driver knows when a unit is
complete without the job keeping any order. Units are committed in groups (every `commit_every_s`
seconds and at the end): a killed run loses at most the uncommitted ones, and the re-run does only those.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipelines.embed.groups import StagedGroups
from pipelines.embed.options import EmbedOptions
from pipelines.embed.sources import (
    GEO_SAMPLE_FIELDS,
    change_reason,
    discover_archive,
    gone_units,
    plan_units,
    read_unit,
)
from pipelines.encoders import CheckpointBlob, read_checkpoint, restore_encoders
from pipelines.ray_env import worker_env
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import CAPTION_COLUMNS, META_COLUMNS, build_table
from pipelines.store.writer import VersionWriter

log = logging.getLogger(__name__)

OBJECT_STORE_BUDGET = 256 << 20  # bytes of queued blocks per encoder actor (see _run)
READ_BATCH = 32  # samples per block leaving a read task (bounds block size: 32 x 3 x 256 x 256 x 4 B = 25 MB)
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class EmbedReport:
    model_id: str
    store_url: str
    version_url: str
    archive_kind: str
    units_total: int
    units_done_before: int
    units_embedded: int = 0
    images: int = 0
    captions: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)
    failed_units: list[dict[str, str]] = field(default_factory=list)
    changed_units: list[str] = field(default_factory=list)  # committed units whose source changed since
    replaced_units: list[str] = field(default_factory=list)  # of those, the ones this run re-embedded
    gone_units: list[str] = field(default_factory=list)  # committed units the archive no longer lists
    removed_units: list[str] = field(default_factory=list)  # of those, the ones this run's commits unlisted
    seconds: float = 0.0
    # job start -> first embeddings back at the driver (actor start-up and model load)
    first_result_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        return (
            f"embedded {self.images} images and {self.captions} captions from {self.units_embedded} unit(s) "
            f"({len(self.replaced_units)} replacing changed ones, {self.units_done_before} already in the store, "
            f"{len(self.removed_units)} gone from the archive removed, "
            f"{len(self.bad)} bad sample(s) skipped, "
            f"{len(self.failed_units)} unit(s) failed) into {self.version_url} in {self.seconds:.1f}s"
        )


# ---------------------------------------------------------------------------------------------- Ray stages


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _rows_to_batch(rows: list[dict[str, Any]], pixel_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    pixels = np.zeros((len(rows), *pixel_shape), np.float32)
    for i, r in enumerate(rows):
        if r.get("pixels") is not None:
            pixels[i] = r["pixels"]
    obj = lambda name: np.array([r.get(name) or "" for r in rows], dtype=object)  # noqa: E731
    return {
        "kind": obj("kind"),
        "unit": obj("unit"),
        "key": obj("key"),
        "source": obj("source"),
        "split": obj("split"),
        "class": obj("class"),
        "lat": np.array([_nan(r.get("lat")) for r in rows], np.float64),
        "lon": np.array([_nan(r.get("lon")) for r in rows], np.float64),
        **{k: obj(k) for k in GEO_SAMPLE_FIELDS if k != "cloud_cover"},
        "cloud_cover": np.array([_nan(r.get("cloud_cover")) for r in rows], np.float64),
        "captions": np.array([json.dumps(r.get("captions") or []) for r in rows], dtype=object),
        "error": obj("error"),
        "count": np.array([int(r.get("count") or 0) for r in rows], np.int64),
        "want": np.array([r.get("pixels") is not None for r in rows], bool),
        "pixels": pixels,
    }


def read_units(
    batch: dict[str, np.ndarray], *, image_size: int, mean, std, storage_options: dict[str, Any] | None
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage (tasks): unit specs (JSON) in, their preprocessed samples out in blocks of READ_BATCH rows."""
    from ssjdn.transforms import ImageTransform

    transform = ImageTransform(image_size, train=False, mean=mean, std=std)
    for spec in batch["unit"]:
        yield from _read_one(json.loads(spec), transform, (3, image_size, image_size), storage_options)


def _read_one(unit: dict[str, Any], transform, shape, storage_options) -> Iterator[dict[str, np.ndarray]]:
    from ssjdn.data.images import decode_image

    want_images = "images" in unit["tables"]
    want_captions = "captions" in unit["tables"]
    rows: list[dict[str, Any]] = []
    count = 0
    error = None
    try:
        for s in read_unit(unit, storage_options):
            row = {k: s.get(k) for k in (*META_COLUMNS, *GEO_SAMPLE_FIELDS, "captions", "error")}
            row.update(kind="sample", unit=unit["id"])
            if not want_captions:  # the encoder embeds every caption it is given
                row["captions"] = []
            if row["error"] is None and want_images:
                try:
                    row["pixels"] = transform.array(
                        decode_image(s["image"], s["name"])
                    )  # numpy: no torch here
                except Exception as exc:  # ImageDecodeError names the file; anything else is a bad image too
                    row["error"] = str(exc) or type(exc).__name__
            rows.append(row)
            count += 1
            if len(rows) >= READ_BATCH:
                yield _rows_to_batch(rows, shape)
                rows = []
    except Exception as exc:  # the unit itself is unreadable (missing, truncated tar, storage down)
        error = f"{type(exc).__name__}: {exc}"
    if rows:
        yield _rows_to_batch(rows, shape)
    eof = {"kind": "eof", "unit": unit["id"], "count": count, "error": error}
    yield _rows_to_batch([eof], shape)


OUT_COLUMNS = ("table", "unit", *META_COLUMNS, *GEO_SAMPLE_FIELDS, *CAPTION_COLUMNS, "error", "count")
FLOAT_COLUMNS = ("lat", "lon", "cloud_cover")


class EncodeBatch:
    """Ray Data stage (callable class on an actor pool): the checkpoint's model is loaded once per actor."""

    def __init__(self, checkpoint: list, device: str, threads: int) -> None:
        import ray
        import torch

        if device == "cpu" and threads > 0:
            # Ray sets OMP_NUM_THREADS from the actor's CPUs; use exactly the threads it was given.
            torch.set_num_threads(threads)
        blob = checkpoint[0]
        blob = ray.get(blob) if isinstance(blob, ray.ObjectRef) else blob
        self.enc = restore_encoders(blob, device=device)
        self.dim = self.enc.dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["kind"])
        usable = (batch["kind"] == "sample") & (batch["error"] == "")
        want = batch["want"].astype(bool) & usable
        out: dict[str, list] = {k: [] for k in OUT_COLUMNS}
        embs: list[np.ndarray] = []
        pixels = batch["pixels"][want]
        img = self.enc.encode_pixels(pixels) if len(pixels) else np.empty((0, self.dim), np.float32)
        img_iter = iter(img)
        texts, text_rows = [], []
        for i in range(n):
            kind = batch["kind"][i]
            table = "eof" if kind == "eof" else "bad" if not usable[i] else "images" if want[i] else "noimage"
            self._append(out, batch, i, table)
            embs.append(next(img_iter) if table == "images" else np.zeros(self.dim, np.float32))
            if usable[i]:
                for j, cap in enumerate(json.loads(batch["captions"][i])):
                    texts.append(cap)
                    text_rows.append((i, j, cap))
        if texts:
            cap_emb = self.enc.encode_texts(texts)
            for (i, j, cap), e in zip(text_rows, cap_emb):
                self._append(out, batch, i, "captions", caption=(j, cap))
                embs.append(e)
        result = {k: np.array(v, dtype=object) for k, v in out.items()}
        for k in FLOAT_COLUMNS:
            result[k] = np.array(out[k], np.float64)
        for k, v in result.items():  # empty object arrays would lose their type
            if v.dtype == object and len(v) == 0:
                result[k] = np.array([], dtype=str)
        result["count"] = np.array(out["count"], np.int64)
        result["caption_index"] = np.array(out["caption_index"], np.int64)
        result["embedding"] = (
            np.stack(embs).astype(np.float32) if embs else np.empty((0, self.dim), np.float32)
        )
        return result

    @staticmethod
    def _append(out, batch, i, table, caption=None) -> None:
        key = batch["key"][i]
        out["table"].append(table)
        out["unit"].append(batch["unit"][i])
        out["key"].append(f"{key}__cap{caption[0]}" if caption else key)
        out["image_key"].append(key)
        out["caption_index"].append(caption[0] if caption else -1)
        out["caption"].append(caption[1] if caption else "")
        # the store's columns after `key`, and the bookkeeping
        for k in (*META_COLUMNS[1:], *GEO_SAMPLE_FIELDS, "error", "count"):
            out[k].append(batch[k][i])


# ---------------------------------------------------------------------------------------------- driver


class _UnitRows:
    """Rows of one unit collected by the driver until its marker and all its samples have arrived."""

    def __init__(self) -> None:
        self.cols: dict[str, dict[str, list]] = {"images": {}, "captions": {}}
        self.embs: dict[str, list[np.ndarray]] = {"images": [], "captions": []}
        self.samples = 0
        self.expected: int | None = None
        self.error: str | None = None
        self.bad: list[dict[str, str]] = []

    def add(self, table: str, row: dict[str, Any], emb: np.ndarray) -> None:
        if table in ("images", "bad", "noimage"):
            self.samples += 1
        if table == "bad":
            self.bad.append({"key": row["key"], "reason": row["error"]})
            return
        if table not in self.cols:
            return
        cols = self.cols[table]
        names = META_COLUMNS + GEO_SAMPLE_FIELDS + (CAPTION_COLUMNS if table == "captions" else ())
        for name in names:
            v = row[name]
            if name in FLOAT_COLUMNS:
                v = None if math.isnan(v) else float(v)
            elif name == "caption_index":
                v = int(v)
            elif v == "" and name in ("split", "class", *GEO_SAMPLE_FIELDS):
                v = None
            elif name == "geometry":
                v = bytes.fromhex(v)
            elif name == "datetime":
                v = _timestamp(v, row["key"])
            cols.setdefault(name, []).append(v)
        self.embs[table].append(emb)

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.samples >= self.expected


def _timestamp(text: str, key: str) -> datetime | None:
    """A chip's ISO datetime (STAC: `2024-05-01T10:30:00Z`) as an aware UTC datetime; None, logged, when
    it does not parse (the chip is stored without one rather than failing its unit)."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        log.warning("chip %s: datetime %r is not ISO 8601; stored without one", key, text[:60])
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _ensure_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to `address` (or RAY_ADDRESS) or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        # More logical CPUs than cores: read tasks and encoder actors must not starve each other (PITFALLS).
        kwargs["num_cpus"] = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    # A Ray started here inherits this process's environment (credentials included): nothing to pass.
    import ray.data  # noqa: F401  (its console logging is set up on import: rerouted below)

    from pipelines.logfile import quiet_ray_env, reroute

    reroute()  # Ray's and Ray Data's console handlers (added on import) -> the command's log file
    if not address and not os.environ.get("SSJDN_LIBRARY_LOGS_ON_CONSOLE"):
        quiet_ray_env(log_to_driver=False)
    ray.init(**kwargs)
    return True


def embed_archive(
    archive_url: str,
    store_url: str,
    checkpoint_url: str,
    options: EmbedOptions | None = None,
    **overrides: Any,
) -> EmbedReport:
    """Embed what `archive_url` holds that the store's version for this checkpoint does not have yet.

    `options` (default `EmbedOptions()`), with any of its fields overridden by keyword
    (`embed_archive(archive, store, ckpt, captions=True)`).
    """
    t0 = time.monotonic()
    options = dataclasses.replace(options or EmbedOptions(), **overrides)
    storage_options = options.storage_options
    blob = read_checkpoint(checkpoint_url, storage_options)
    enc = restore_encoders(blob)  # fail fast, before any Ray work, when the checkpoint does not load
    store_options = options.store_options if options.store_options is not None else storage_options
    store = EmbeddingStore(store_url, store_options)
    writer_kwargs = {"max_rows_per_file": options.max_rows_per_file} if options.max_rows_per_file else {}
    writer = VersionWriter(store, blob.model_id, enc.model_info(blob, options.dtype), **writer_kwargs)
    tables = ("images", "captions") if options.captions else ("images",)
    splits = list(options.splits) if options.splits else None
    archive = discover_archive(
        archive_url, storage_options, splits=splits, follow_symlinks=options.follow_symlinks
    )
    kind, shard_units, samples = archive.kind, archive.units, archive.samples
    refused = [x for x in shard_units + samples if x.get("refused")]
    shard_units = [u for u in shard_units if not u.get("refused")]
    samples = [s for s in samples if not s.get("refused")]
    todo, complete, changed = plan_units(shard_units, samples, writer.done(), tables, options.chunk_size)
    gone = gone_units(archive, writer.done())
    report = EmbedReport(
        model_id=blob.model_id,
        store_url=store.url,
        version_url=store.version_url(blob.model_id),
        archive_kind=kind,
        units_total=len(todo) + complete,
        units_done_before=complete,
        changed_units=changed,
        gone_units=[g["id"] for g in gone],
    )
    # Refused, never read; not part of any unit, so a later run with --follow-symlinks embeds them.
    report.bad.extend({"unit": None, "key": x.get("key") or x["id"], "reason": x["refused"]} for x in refused)
    prior_units = writer.done()
    for uid in changed:
        unit = next(u for u in shard_units if u["id"] == uid)
        log.info("re-embedding %s: %s", uid, change_reason(unit, prior_units[uid]))
    for g in gone:
        log.info("removing %s from the store: %s no longer lists it", g["id"], archive_url)
    for b in report.bad:
        log.warning("refused: %s", b["reason"])
    groups = StagedGroups.plan(writer, todo, gone)
    if not todo:
        if gone:
            try:
                writer.commit()
            finally:
                writer.close()
            report.removed_units = list(writer.removed)
        report.seconds = time.monotonic() - t0
        if not gone:
            log.info(
                "nothing new in %s for model %s: store %s unchanged", archive_url, blob.model_id[:12], store.url
            )
        else:
            log.info("%s", report.summary())
        return report
    log.info(
        "embedding %d unit(s) of %s (%s; %d already in the store) with model %s -> %s",
        len(todo),
        archive_url,
        kind,
        complete,
        blob.model_id[:12],
        report.version_url,
    )
    writer.remove_stale_staging()
    started = _ensure_ray(options.ray_address, None)
    try:
        _run(
            todo,
            enc,
            blob,
            groups,
            report,
            tables,
            batch_size=options.batch_size,
            concurrency=options.concurrency,
            gpu=options.gpu,
            dtype=options.dtype,
            storage_options=storage_options,
            commit_every_s=options.commit_every_s,
            threads=options.threads_per_actor,
            progress=options.progress,
            started_here=started,
        )
    finally:
        writer.close()
        if started:
            import ray

            ray.shutdown()
    report.seconds = time.monotonic() - t0
    report.replaced_units = list(writer.replaced)
    report.removed_units = list(writer.removed)
    for b in report.bad:
        if b.get("unit") is not None:  # the refused ones were reported before the run
            log.warning("bad sample skipped: %s: %s", b["key"], b["reason"])
    for f in report.failed_units:
        log.error("unit not embedded (re-run to retry): %s: %s", f["unit"], f["reason"])
    if options.build_ann and report.images:
        from pipelines.search.ann import build_ann

        build_ann(store.snapshot(blob.model_id))
    log.info("%s", report.summary())
    return report


def _run(
    todo,
    enc,
    blob: CheckpointBlob,
    groups: StagedGroups,
    report: EmbedReport,
    tables,
    *,
    batch_size,
    concurrency,
    gpu,
    dtype,
    storage_options,
    commit_every_s,
    threads,
    progress,
    started_here,
) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    # Backpressure: decoded pixel blocks waiting for the encoder may take this much of the object store, not a
    # fraction of it. Decoding outruns encoding, so without a cap the queue - and the job's memory - grows with
    # the archive until Ray's default budget (30 % of the object store) is reached.
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(
        object_store_memory=OBJECT_STORE_BUDGET * max(1, concurrency)
    )
    cfg = enc.cfg
    writer = groups.writer
    units = {u["id"]: u for u in todo}
    # Workers of a cluster we did not start may lack the endpoint/offline settings: pass those (never
    # credentials: Ray logs runtime_env values; the nodes take credentials from their own environment).
    remote = {} if started_here else {"runtime_env": {"env_vars": worker_env()}}
    # Idle OpenMP threads must sleep, not spin: spinning threads of several processes on few cores starve
    # each other (it has to be in the environment before torch starts, hence the actor's runtime env).
    encoder_env = {**(worker_env() if not started_here else {}), "OMP_WAIT_POLICY": OMP_WAIT_POLICY}
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        read_units,
        batch_size=1,
        fn_kwargs={
            "image_size": int(cfg.data.image_size),
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "storage_options": storage_options,
        },
        num_cpus=1,
        **remote,
    )
    cpu_threads = threads or max(1, (os.cpu_count() or 1) // max(1, concurrency))
    ds = ds.map_batches(
        EncodeBatch,
        batch_size=int(batch_size),
        compute=ActorPoolStrategy(size=concurrency),
        fn_constructor_kwargs={
            "checkpoint": [ray.put(blob)],
            "device": "cuda" if gpu else "cpu",
            "threads": 0 if gpu else cpu_threads,
        },
        # Honest CPU accounting (the actor runs `cpu_threads` torch threads); it also keeps Ray from fusing the
        # decode tasks into the encoder actors, so decoding overlaps encoding in other processes.
        num_cpus=1 if gpu else cpu_threads,
        num_gpus=1 if gpu else 0,
        runtime_env={"env_vars": encoder_env},
    )
    buffers: dict[str, _UnitRows] = {}
    created_at = datetime.now(timezone.utc)
    started = last_commit = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if report.first_result_s is None:
            report.first_result_s = time.monotonic() - started
        emb = batch["embedding"]
        touched = set()
        for i in range(len(batch["table"])):
            table, uid = batch["table"][i], batch["unit"][i]
            buf = buffers.setdefault(uid, _UnitRows())
            touched.add(uid)
            if table == "eof":
                buf.expected, buf.error = int(batch["count"][i]), batch["error"][i] or None
            else:
                buf.add(table, {k: batch[k][i] for k in batch if k not in ("embedding", "table")}, emb[i])
        # A sample's caption rows travel in the same output batch as its image row: check after the batch.
        for uid in touched:
            if buffers[uid].complete:
                _finish_unit(units[uid], buffers.pop(uid), groups, report, dtype, created_at)
        if time.monotonic() - last_commit >= commit_every_s:
            writer.commit()
            last_commit = time.monotonic()
    writer.commit()
    log.debug("Ray Data stats:\n%s", ds.stats())
    for uid, buf in buffers.items():  # never completed: the stream ended early
        reason = buf.error or "incomplete: not every sample came back"
        report.failed_units.extend(groups.unit_failed(units[uid], reason))
    report.failed_units.extend(groups.unfinished())


def _finish_unit(
    unit, buf: _UnitRows, groups: StagedGroups, report: EmbedReport, dtype: str, created_at
) -> None:
    expected = unit.get("expected")
    if buf.error or (expected is not None and buf.samples != expected):
        reason = buf.error or f"read {buf.samples} of the {expected} samples the archive lists"
        report.failed_units.extend(groups.unit_failed(unit, reason))
        return
    held_back = groups.held_back(unit)
    if held_back:
        report.failed_units.append({"unit": unit["id"], "reason": held_back})
        return
    writer = groups.writer
    out = {}
    for table in unit["tables"]:
        embs = np.stack(buf.embs[table]) if buf.embs[table] else np.empty((0, writer.dim), np.float32)
        out[table] = build_table(
            table,
            buf.cols[table],
            embs,
            dim=writer.dim,
            model_id=writer.model_id,
            dtype=dtype,
            created_at=created_at,
        )
    entry = {k: unit.get(k) for k in ("id", "kind", "url", "split", "fingerprint")}
    if unit["kind"] == "files":
        entry["keys"] = sorted(s["key"] for s in unit["samples"])
    entry["bad"] = buf.bad
    for staged_unit, staged_entry, staged in groups.finished(unit, entry, out):
        report.units_embedded += 1
        report.images += staged["images"].num_rows if "images" in staged else 0
        report.captions += staged["captions"].num_rows if "captions" in staged else 0
        report.bad.extend({"unit": staged_unit["id"], **b} for b in staged_entry["bad"])
