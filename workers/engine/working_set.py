"""The prompt blocks a replica's requests asked for lately: how much of its KV pool its traffic
keeps wanted, counted on the replica itself.

A router counts the same from its own sends (`router/working_sets.py`) and places new prefixes
away from replicas whose pools are wanted in full. With several ingress routers each sends a
replica only its share of the traffic, and a pool that all of them together keep full looks
half empty to each; the replica's count, in its heartbeat, is the whole.
"""

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from kvserve.workers.engine.block_hash import BlockHash

WINDOW_S = 60.0  # router_options.working_set_window_s's default


class RecentBlocks:
    """The distinct blocks asked for within the last `window_s`, at most `limit` of them (the
    oldest asked go first: enough to tell a full pool from an overfull one)."""

    def __init__(self, limit: int, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._last_asked: OrderedDict[BlockHash, float] = OrderedDict()  # oldest first

    def ask(self, block_hashes: Iterable[BlockHash]) -> None:
        now, last_asked = self.clock(), self._last_asked
        for block_hash in block_hashes:
            last_asked[block_hash] = now
            last_asked.move_to_end(block_hash)
        while len(last_asked) > self.limit:
            last_asked.popitem(last=False)

    def count(self) -> int:
        horizon, last_asked = self.clock() - self.window_s, self._last_asked
        while last_asked and next(iter(last_asked.values())) < horizon:
            last_asked.popitem(last=False)
        return len(last_asked)
