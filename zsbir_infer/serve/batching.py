"""Dynamic micro-batching: concurrent search requests are embedded and searched together.

Each request submits one query (a decoded image or an embedding) with its ``k`` and ``domain``. One worker
task takes the first waiting query, then keeps collecting more (of any ``k``; queries of each domain are
searched together) until the batch holds ``max_batch`` queries or ``max_wait_ms`` have passed. It waits only
while other requests are known to be on their way (they called :meth:`MicroBatcher.expect` and are still
decoding their image), so a lone client pays no waiting time. The batch runs in a worker thread through the
same :meth:`Retriever.search <zsbir_infer.retriever.Retriever.search>` as every other caller; each request
gets its own ``k`` best hits back. When a batch fails, its queries are retried one by one, so one bad query
cannot fail the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

__all__ = ["MicroBatcher"]

SearchFn = Callable[[list[Any], int, str], list[list[Any]]]


@dataclass
class _Item:
    query: Any
    k: int
    domain: str
    future: asyncio.Future[list[Any]]
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Collects concurrent queries into batches for ``search(queries, k, domain) -> hits per query``."""

    def __init__(
        self,
        search: SearchFn,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative; got {max_wait_ms}")
        self.search = search
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expected = 0

    @property
    def enabled(self) -> bool:
        """Whether queries are batched at all (``max_batch`` > 1)."""
        return self.max_batch > 1

    def expect(self) -> None:
        """A request has started that will :meth:`submit` (or :meth:`cancel`) soon: a batch may wait for it."""
        self._expected += 1

    def cancel(self) -> None:
        """An :meth:`expect`-ed request will not submit after all (bad input)."""
        self._expected = max(0, self._expected - 1)

    def queued(self) -> int:
        """Queries waiting for a batch."""
        return 0 if self._queue is None else self._queue.qsize()

    def _ensure_worker(self) -> asyncio.Queue[_Item]:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop or self._worker is None or self._worker.done():
            if self._loop is not loop or self._queue is None:
                self._queue = asyncio.Queue()
            self._loop = loop
            self._worker = loop.create_task(self._run(self._queue), name="zsbir-microbatcher")
        return self._queue

    async def submit(self, query: Any, k: int, domain: str) -> list[Any]:
        """The ``k`` best hits for one query (raises what the search raised for it)."""
        self.cancel()  # it is here now
        if not self.enabled:
            rows = await anyio.to_thread.run_sync(self.search, [query], k, domain)
            if self.on_batch is not None:
                self.on_batch(1, 0.0)
            return list(rows[0])
        queue = self._ensure_worker()
        if queue.qsize() >= self.max_queue:
            raise OverflowError(f"the server is overloaded ({queue.qsize()} queries waiting); try again shortly")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Item(query, int(k), domain, fut))
        return await fut

    async def _collect(self, queue: asyncio.Queue[_Item]) -> list[_Item]:
        batch = [await queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0 or self._expected <= 0:  # nobody else is on the way: do not wait
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), timeout=left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            batch = await self._collect(queue)
            waited = time.perf_counter() - batch[0].queued
            by_domain: dict[str, list[_Item]] = {}
            for item in batch:
                if not item.future.cancelled():
                    by_domain.setdefault(item.domain, []).append(item)
            for domain, items in by_domain.items():
                await self._search(items, domain)
            if self.on_batch is not None:
                self.on_batch(len(batch), waited)

    async def _search(self, items: list[_Item], domain: str) -> None:
        k = max(item.k for item in items)
        try:
            rows = await anyio.to_thread.run_sync(self.search, [item.query for item in items], k, domain)
        except Exception as exc:
            if len(items) == 1:
                if not items[0].future.done():
                    items[0].future.set_exception(exc)
                return
            for item in items:  # find the culprit: every other query still gets its answer
                await self._search([item], domain)
            return
        for item, hits in zip(items, rows, strict=True):
            if not item.future.done():
                item.future.set_result(list(hits)[: item.k])

    async def aclose(self) -> None:
        """Stop the worker (pending queries are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.cancel()
