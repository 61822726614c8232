"""Per-worker input pipeline of distributed training: WebDataset shards -> decoded items -> exact batches.

Why WebDataset with our own rank/worker split and not Ray Data `read_webdataset` + `get_dataset_shard`
(docs/training.md has the long form): the shard list and sample counts are in the shard manifest, so every
rank can compute, without talking to anyone, which shards it reads in an epoch; that makes the split
disjoint by construction, auditable (`plan/epoch-*.json`), resumable mid-epoch (a position is a count per
loader worker), and it keeps the 2-core case free of a Ray Data executor competing with the Train workers.

How an epoch is exact (every train sample once, across all workers):
1. `assign_shards`: the train shards are permuted with (seed, epoch) and dealt to ranks, largest first, each to
   the rank with the fewest samples so far. Every shard goes to exactly one rank.
2. `split_for_loader` deals a rank's shards to its DataLoader workers the same way; each worker reads its
   shards completely (a seeded shuffle buffer reorders samples inside the worker, never drops them).
3. `Rebatcher` turns the stream of items into batches of exactly `batch_size`; the epoch's last partial
   batch is kept (merged into the previous one when it would hold a single sample: in-batch negatives).
4. Ranks may end up with a different number of batches; the training loop runs in lockstep until every
   rank is out of data, and a rank that is already done contributes zero gradient (pipelines.train.worker).
Bad samples (unreadable member, undecodable image) are skipped, counted and named, never silently dropped.

A DataLoader worker yields chunks `(worker_id, [entry, ...])`; an entry is a training item
`(pixels [3, H, W], caption, class_index or -1, key)` or a `BadItem`. `Rebatcher` consumes entries in arrival
order, so what it has consumed from each worker is always a prefix of that worker's deterministic stream:
the data position of a checkpoint is one count per (rank, loader worker), and a resumed worker skips that
many entries *before* decoding them.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from pipelines.train.spec import ShardRef
from ssjdn.batching import BadItem

# Entries per IPC message from a loader worker: amortises the queue cost without delaying the first batch.
DEFAULT_CHUNK = 8


class TrainDataError(ValueError):
    """The shards cannot feed this run at training time (a rank without any usable sample, no readable eval sample)."""


# ----------------------------------------------------------------------------------------------- planning


def _stable_seed(*parts: Any) -> int:
    """A 64-bit seed from the parts, the same in every process (unlike `hash()` of a str)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _deal(shards: Sequence[ShardRef], n: int) -> list[list[ShardRef]]:
    """Largest shard first, each to the bin with the fewest samples so far (ties: lowest bin index)."""
    bins: list[list[ShardRef]] = [[] for _ in range(n)]
    load = [0] * n
    for s in sorted(shards, key=lambda s: -s.samples):  # stable: keeps the caller's order among equal sizes
        i = min(range(n), key=lambda b: (load[b], b))
        bins[i].append(s)
        load[i] += s.samples
    return bins


def assign_shards(shards: Sequence[ShardRef], world_size: int, epoch: int, seed: int) -> list[list[ShardRef]]:
    """Disjoint, sample-balanced shard lists per rank for `epoch` (a different deal every epoch)."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    order = list(shards)
    random.Random(_stable_seed("assign", seed, epoch)).shuffle(order)
    return _deal(order, world_size)


def split_for_loader(shards: Sequence[ShardRef], num_workers: int) -> list[list[ShardRef]]:
    """A rank's shards dealt to its DataLoader workers (balanced, so they run dry at about the same time)."""
    return _deal(shards, max(1, num_workers))


def batches_for(samples: int, batch_size: int) -> int:
    """Batches `Rebatcher` makes of `samples` good items (a single leftover joins the last full batch)."""
    q, r = divmod(samples, batch_size)
    return q + (1 if r >= 2 else 0)


def lockstep_steps(parts: Sequence[Sequence[ShardRef]], batch_size: int) -> int:
    """Steps of an epoch when every rank steps until the last one runs out (no bad samples)."""
    return max(batches_for(sum(s.samples for s in part), batch_size) for part in parts)


# ----------------------------------------------------------------------------------------------- decoding


def _choose_caption(sample: dict[str, Any], rng: random.Random) -> str:
    captions = [c for c in (sample["meta"].get("captions") or []) if isinstance(c, str) and c.strip()]
    if not captions and sample.get("txt"):
        captions = [sample["txt"]]
    if not captions:
        raise ValueError("no caption")
    return captions[rng.randrange(len(captions))]


def decode_train_item(sample: dict[str, Any], transform, seed: int, epoch: int):
    """Decoded training item for a raw shard sample, or a `BadItem` naming the sample and the reason.

    Caption choice and augmentation are seeded by (seed, epoch, key): reproducible whatever the number of
    ranks, loader workers or resumes.
    """
    import torch

    from ssjdn.data.images import decode_image

    key, where = sample["key"], f"{sample.get('url')}#{sample['key']}"
    s = _stable_seed("item", seed, epoch, key)
    try:
        caption = _choose_caption(sample, random.Random(s))
        torch.manual_seed(s & 0x7FFF_FFFF_FFFF_FFFF)  # ImageTransform draws from torch's global generator
        pixels = transform(decode_image(sample["image"], where))
    except Exception as exc:  # noqa: BLE001 - any failure of one sample is that sample's problem
        return BadItem(key, str(sample.get("url")), f"{type(exc).__name__}: {exc}")
    cls = sample.get("cls")
    return pixels, caption, -1 if cls is None else int(cls), key


def decode_eval_item(sample: dict[str, Any], transform):
    """(key, pixels, captions, class_index or None) for evaluation, or a `BadItem`."""
    from ssjdn.data.images import decode_image

    key, where = sample["key"], f"{sample.get('url')}#{sample['key']}"
    try:
        captions = [c for c in (sample["meta"].get("captions") or []) if isinstance(c, str) and c.strip()]
        if not captions:
            raise ValueError("no caption")
        pixels = transform(decode_image(sample["image"], where))
    except Exception as exc:  # noqa: BLE001
        return BadItem(key, str(sample.get("url")), f"{type(exc).__name__}: {exc}")
    return key, pixels, captions, sample.get("cls")


# ----------------------------------------------------------------------------------------------- streams


def _identity(urls):
    return urls


class _ReadErrors:
    """webdataset handler: records the exception as a BadItem (shard and key when known) and goes on."""

    _WHERE = re.compile(r"^(?P<url>.*?): sample '(?P<key>[^']*)'")

    def __init__(self) -> None:
        self.pending: list[BadItem] = []

    def __call__(self, exc: BaseException) -> bool:
        text = str(exc)
        m = self._WHERE.match(text)
        key, source = (m["key"], m["url"]) if m else ("?", text[:300])
        self.pending.append(BadItem(key, source, f"{type(exc).__name__}: {text}"))
        return True


def raw_entries(shards: Sequence[ShardRef], storage_options=None) -> Iterator[dict[str, Any] | BadItem]:
    """Raw samples of `shards` read in order (image bytes not decoded), with read failures as BadItems."""
    from pipelines.shard.read import open_shards

    if not shards:
        return
    errors = _ReadErrors()
    ds = open_shards(
        [s.url for s in shards],
        storage_options=storage_options,
        nodesplitter=_identity,  # shards are assigned to ranks and workers by us (see assign_shards)
        workersplitter=_identity,
        handler=errors,
    )
    for sample in ds:
        while errors.pending:
            yield errors.pending.pop(0)
        yield sample
    yield from errors.pending


def shuffled(entries: Iterable[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Seeded shuffle buffer: every entry comes out exactly once; memory is `buffer` entries."""
    if buffer <= 1:
        yield from entries
        return
    buf: list[Any] = []
    for e in entries:
        buf.append(e)
        if len(buf) >= buffer:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _chunks(worker_id: int, entries: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    chunk: list[Any] = []
    for e in entries:
        chunk.append(e)
        if len(chunk) >= size:
            yield worker_id, chunk
            chunk = []
    if chunk:
        yield worker_id, chunk


def _loader_worker() -> tuple[int, int]:
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainShardStream(IterableDataset):
    """One rank's training shards for one epoch; yields `(worker_id, [entry, ...])`.

    `skip[w]`: entries loader worker `w` skips before decoding (resume inside an epoch).
    """

    def __init__(
        self,
        shards: Sequence[ShardRef],
        *,
        transform,
        epoch: int,
        seed: int,
        rank: int,
        shuffle_buffer: int,
        skip: Sequence[int] = (),
        chunk: int = DEFAULT_CHUNK,
        storage_options=None,
    ) -> None:
        self.shards, self.transform, self.epoch, self.seed, self.rank = (
            list(shards),
            transform,
            epoch,
            seed,
            rank,
        )
        self.shuffle_buffer, self.skip, self.chunk = shuffle_buffer, list(skip), chunk
        self.storage_options = storage_options

    def __iter__(self) -> Iterator[tuple[int, list[Any]]]:
        import itertools

        w, n = _loader_worker()
        mine = split_for_loader(self.shards, n)[w]
        rng = random.Random(_stable_seed("shuffle", self.seed, self.epoch, self.rank, w))
        entries = shuffled(raw_entries(mine, self.storage_options), self.shuffle_buffer, rng)
        skip = self.skip[w] if w < len(self.skip) else 0
        entries = itertools.islice(entries, skip, None)  # consumed before the checkpoint: not decoded again
        decoded = (
            e if isinstance(e, BadItem) else decode_train_item(e, self.transform, self.seed, self.epoch)
            for e in entries
        )
        yield from _chunks(w, decoded, self.chunk)


class EvalShardStream(IterableDataset):
    """Eval shards; yields `(worker_id, [(key, pixels, captions, class) | BadItem, ...])`."""

    def __init__(
        self, shards: Sequence[ShardRef], *, transform, chunk: int = DEFAULT_CHUNK, storage_options=None
    ):
        self.shards, self.transform, self.chunk, self.storage_options = (
            list(shards),
            transform,
            chunk,
            storage_options,
        )

    def __iter__(self):
        w, n = _loader_worker()
        mine = split_for_loader(self.shards, n)[w]
        decoded = (
            e if isinstance(e, BadItem) else decode_eval_item(e, self.transform)
            for e in raw_entries(mine, self.storage_options)
        )
        yield from _chunks(w, decoded, self.chunk)


def _pass_through(x):
    return x


def make_loader(stream, num_workers: int, *, prefetch_factor: int = 4, context: str | None = None):
    """A DataLoader running `stream` in `num_workers` processes (decoding and augmentation off this thread)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "multiprocessing_context": context}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_pass_through, **kwargs)


# ----------------------------------------------------------------------------------------------- batching


@dataclass
class Position:
    """Entries consumed per loader worker in the current epoch (a prefix of each worker's stream)."""

    consumed: dict[int, int] = field(default_factory=dict)

    def as_list(self, num_workers: int) -> list[int]:
        return [self.consumed.get(w, 0) for w in range(num_workers)]


class Rebatcher:
    """Chunks of entries -> collated batches of exactly `batch_size` (last one of the epoch may differ).

    Bad entries are recorded in `self.bad` (and counted into the position when consumed). `collate` turns a
    list of items into a batch dict (e.g. `ssjdn.batching.collate` with the tokenizer bound).
    """

    def __init__(
        self,
        chunks: Iterable[tuple[int, list[Any]]],
        batch_size: int,
        collate: Callable[[list[Any]], dict],
        *,
        position: Position | None = None,
        on_bad: Callable[[BadItem], None] | None = None,
    ) -> None:
        if batch_size < 2:
            raise ValueError("batch_size must be >= 2 (in-batch negatives)")
        self.chunks, self.batch_size, self.collate = iter(chunks), batch_size, collate
        self.position = position if position is not None else Position()
        self.on_bad = on_bad
        self.bad: list[BadItem] = []
        self.items = 0
        self._fifo: deque[tuple[int, Any]] = deque()
        self._good_in_fifo = 0
        self._exhausted = False

    def _fill(self, want: int) -> None:
        while self._good_in_fifo < want and not self._exhausted:
            try:
                worker, entries = next(self.chunks)
            except StopIteration:
                self._exhausted = True
                return
            for e in entries:
                self._fifo.append((worker, e))
                self._good_in_fifo += not isinstance(e, BadItem)

    def _take(self, n_good: int) -> list[Any]:
        """Pop entries in arrival order until `n_good` good items are taken; bad ones on the way are consumed."""
        items: list[Any] = []
        while self._fifo and (len(items) < n_good or isinstance(self._fifo[0][1], BadItem)):
            worker, e = self._fifo.popleft()
            self.position.consumed[worker] = self.position.consumed.get(worker, 0) + 1
            if isinstance(e, BadItem):
                self.bad.append(e)
                if self.on_bad is not None:
                    self.on_bad(e)
            else:
                items.append(e)
                self._good_in_fifo -= 1
        return items

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        b = self.batch_size
        # Look one item past a full batch: if only one item would be left for the epoch, it joins this batch.
        self._fill(b + 2)
        if self._good_in_fifo == 0:
            self._take(0)  # trailing bad entries still count as consumed
            raise StopIteration
        n = b + 1 if self._exhausted and self._good_in_fifo == b + 1 else min(b, self._good_in_fifo)
        items = self._take(n)
        if len(items) < 2:
            # A whole epoch of one sample on this rank: nothing to contrast it with; counted as skipped.
            for it in items:
                self.bad.append(BadItem(it[3], "", "alone in its batch (no in-batch negatives)"))
            raise StopIteration
        self.items += len(items)
        return self.collate(items)
