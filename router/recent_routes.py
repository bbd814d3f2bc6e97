"""The router's own recent decisions, until the replicas' KV events catch up with them.

A request's blocks enter the index only once its replica has scheduled it and the events have
come back through the hub. A follow-up sent meanwhile (the next turn of a conversation, a
burst on a new shared prefix) would find no holder and land anywhere; these entries send it
after the first. They expire after `ttl_s`, by when the events have normally arrived.
"""

import time
from collections import deque

from kvserve.router.kv_index import leading_matches
from kvserve.workers.block_hash import BlockHash

_NOTHING: dict[BlockHash, int] = {}


class RecentRoutes:
    def __init__(self, ttl_s: float = 5.0):
        self.ttl_s = ttl_s
        self._log: deque[tuple[float, str, list[BlockHash]]] = deque()
        self._sent: dict[str, dict[BlockHash, int]] = {}  # replica -> its blocks' requests in the log

    def add(self, replica: str, block_hashes: list[BlockHash], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._expire(now)
        self._log.append((now + self.ttl_s, replica, block_hashes))
        sent = self._sent.setdefault(replica, {})
        for block_hash in block_hashes:
            sent[block_hash] = sent.get(block_hash, 0) + 1

    def prefix_matches(
        self, block_hashes: list[BlockHash], replicas: list[str], now: float | None = None
    ) -> dict[str, int]:
        """For each replica, how many leading blocks of `block_hashes` were recently sent there."""
        self._expire(time.monotonic() if now is None else now)
        return leading_matches(block_hashes, replicas, lambda r: self._sent.get(r, _NOTHING))

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] <= now:
            _, replica, block_hashes = self._log.popleft()
            sent = self._sent[replica]
            for block_hash in block_hashes:
                sent[block_hash] -= 1
                if sent[block_hash] == 0:
                    del sent[block_hash]
            if not sent:
                del self._sent[replica]
