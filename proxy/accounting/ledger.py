"""The ledger: every generation record, queued in memory by the request path and written in batches.

Why a queue: a request must never wait for storage (DESIGN.md, hot-path rule 3). `append` is synchronous and
cheap, so it runs from a `finally` even when the client is gone. A background task writes the queue every
`flush_interval_s`; a graceful stop writes what is left. A crash loses at most the records of the last flush
interval. While the store is unreachable, records wait in a bounded queue (`queue_max`); past that the oldest
are dropped and counted (`dropped`), never blocking a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from proxy.store.base import GenerationRecord, Store, StoreError

log = logging.getLogger("hedgerow")

_BATCH = 250  # records per store write: a Redis write encodes on the event loop, so keep each one short


class Ledger:
    __slots__ = (
        "_full",
        "_pending",
        "_queue",
        "dropped",
        "failures",
        "flush_interval_s",
        "queue_max",
        "store",
        "written",
    )

    def __init__(self, store: Store, flush_interval_s: float, queue_max: int) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self._queue: deque[GenerationRecord] = deque()
        self._pending: dict[str, GenerationRecord] = {}  # id → queued record, for /api/v1/generation before a flush
        self.written = 0
        self.dropped = 0
        self.failures = 0  # flushes that failed on the store
        self._full: asyncio.Event | None = None  # set once a whole batch is queued: the writer need not wait (`run`)

    def __len__(self) -> int:
        return len(self._queue)

    def append(self, record: GenerationRecord) -> None:
        if len(self._queue) >= self.queue_max:
            old = self._queue.popleft()
            self._pending.pop(old.id, None)
            self.dropped += 1
        self._queue.append(record)
        self._pending[record.id] = record
        if len(self._queue) == _BATCH and self._full is not None:
            self._full.set()

    def pending(self, gen_id: str) -> GenerationRecord | None:
        return self._pending.get(gen_id)

    async def flush(self) -> bool:
        """Write the records queued when the flush began; False if the store failed (the records stay queued).

        Records queued during the flush wait for the next one: under load, a flush that chased the queue would
        never end, and would write the few records finished during each store round trip in a transaction of
        their own (a thread hand-off, a commit and a loop wake-up for every one or two requests)."""
        left = len(self._queue)
        while left > 0 and self._queue:
            batch = [self._queue[i] for i in range(min(_BATCH, left, len(self._queue)))]
            try:
                await self.store.write_generations(batch)
            except StoreError as e:
                self.failures += 1
                log.warning("ledger store unreachable, %d records queued: %s", len(self._queue), e)
                return False
            for rec in batch:  # appends during the write went to the right end; the batch is the left one
                if self._queue and self._queue[0] is rec:
                    self._queue.popleft()
                self._pending.pop(rec.id, None)
            self.written += len(batch)
            left -= len(batch)
        return True

    async def run(self) -> None:
        """The background writer, until cancelled: a flush every interval, or as soon as a batch is queued.

        Why not only every interval: a record kept a second outlives the collector's young generations, and under
        load a second's worth of records (and their attempts) promoted to the oldest one makes the full collections
        that traverse them come often; written a batch at a time they mostly die young. A batch is as big a write
        as the interval's would be, so the store sees no more, nor smaller, transactions."""
        full = self._full = asyncio.Event()
        while True:
            try:
                async with asyncio.timeout(self.flush_interval_s):
                    await full.wait()
            except TimeoutError:
                pass
            full.clear()
            await self.flush()
