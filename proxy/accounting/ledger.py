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
    __slots__ = ("_pending", "_queue", "dropped", "failures", "flush_interval_s", "queue_max", "store", "written")

    def __init__(self, store: Store, flush_interval_s: float, queue_max: int) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self._queue: deque[GenerationRecord] = deque()
        self._pending: dict[str, GenerationRecord] = {}  # id → queued record, for /api/v1/generation before a flush
        self.written = 0
        self.dropped = 0
        self.failures = 0  # flushes that failed on the store

    def __len__(self) -> int:
        return len(self._queue)

    def append(self, record: GenerationRecord) -> None:
        if len(self._queue) >= self.queue_max:
            old = self._queue.popleft()
            self._pending.pop(old.id, None)
            self.dropped += 1
        self._queue.append(record)
        self._pending[record.id] = record

    def pending(self, gen_id: str) -> GenerationRecord | None:
        return self._pending.get(gen_id)

    async def flush(self) -> bool:
        """Write everything queued so far; False if the store failed (the records stay queued)."""
        while self._queue:
            batch = [self._queue[i] for i in range(min(_BATCH, len(self._queue)))]
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
        return True

    async def run(self) -> None:
        """The background writer: flush every interval until cancelled."""
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()
