"""Micro-batching: queries that arrive while the searcher is busy are answered together.

One worker thread owns the searcher's encoders. It takes the next query, then every query already waiting (up
to `max_batch`), and answers them with one `Searcher.search_many` call: one text-encoder call and one pass over
the matrix for all of them. A lone query never waits for company, so one client sees no added latency; under
load, the pass over the matrix - the cost of exact search - is shared. A batch that fails is answered query by
query, so one bad query only fails itself.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from pipelines.search.searcher import Query, Searcher, SearchResult


@dataclass
class _Job:
    query: Query
    future: Future


class Batcher:
    def __init__(self, searcher: Searcher, max_batch: int = 32) -> None:
        self.searcher = searcher
        self.max_batch = max(1, int(max_batch))
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self.batches = 0
        self.queries = 0
        self._thread = threading.Thread(target=self._loop, name="ssjdn-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, query: Query) -> Future:
        future: Future = Future()
        if self._closed:
            future.set_exception(RuntimeError("the service is shutting down"))
            return future
        self._queue.put(_Job(query, future))
        return future

    def close(self, timeout_s: float = 30.0) -> None:
        """Answer what is queued, then stop the worker."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        stop = False
        while not stop:
            job = self._queue.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        self.queries += len(live)
        try:
            results: list[SearchResult] = self.searcher.search_many([j.query for j in live])
        except Exception as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            for j in live:  # find the culprit(s): each query alone
                try:
                    j.future.set_result(self.searcher.search_many([j.query])[0])
                except Exception as one:
                    j.future.set_exception(one)
            return
        for j, result in zip(live, results):
            j.future.set_result(result)
