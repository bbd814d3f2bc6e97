"""The router's own recent decisions, until the replicas' KV events catch up with them.

A request's blocks enter the index only once its replica has scheduled it and the events have
come back through the hub. A follow-up sent meanwhile (the next turn of a conversation, a
burst on a new shared prefix) would find no holder and land anywhere; these entries send it
after the first. They expire after `ttl_s`, by when the events have normally arrived.
"""

import time
from collections import Counter, deque

from kvserve.router.kv_index import leading_matches
from kvserve.workers.block_hash import BlockHash

_NOBODY: Counter = Counter()


class RecentRoutes:
    def __init__(self, ttl_s: float = 5.0):
        self.ttl_s = ttl_s
        self._log: deque[tuple[float, str, list[BlockHash]]] = deque()
        self._holders: dict[BlockHash, Counter[str]] = {}

    def add(self, replica: str, block_hashes: list[BlockHash], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._expire(now)
        self._log.append((now + self.ttl_s, replica, block_hashes))
        for block_hash in block_hashes:
            self._holders.setdefault(block_hash, Counter())[replica] += 1

    def prefix_matches(
        self, block_hashes: list[BlockHash], replicas: list[str], now: float | None = None
    ) -> dict[str, int]:
        """For each replica, how many leading blocks of `block_hashes` were recently sent there."""
        self._expire(time.monotonic() if now is None else now)
        return leading_matches(block_hashes, replicas, lambda h: self._holders.get(h, _NOBODY).keys())

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] <= now:
            _, replica, block_hashes = self._log.popleft()
            for block_hash in block_hashes:
                holders = self._holders[block_hash]
                holders[replica] -= 1
                if holders[replica] == 0:
                    del holders[replica]
                    if not holders:
                        del self._holders[block_hash]
