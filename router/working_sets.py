"""How many KV blocks each replica's recent traffic keeps wanted: its working set.

A pool full of blocks nobody has asked for in a while costs little to overwrite; a pool whose
blocks are all still wanted by ongoing conversations or hot prefixes loses hits with every new
prefix it takes. The index says what a replica holds, not which of it is still wanted; this
says which is: the distinct blocks of the prompts sent there within the last `window_s`.
It counts this router's own decisions; with several ingress replicas each sees its share of
the traffic, in the same proportions.
"""

import time
from collections import OrderedDict

from kvserve.workers.block_hash import BlockHash


class WorkingSets:
    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._sent: dict[str, OrderedDict[BlockHash, float]] = {}  # oldest first

    def add(self, replica: str, block_hashes: list[BlockHash], limit: int, now: float | None = None) -> None:
        """A prompt with this chain of blocks went to `replica`; of its working set, at most
        the newest `limit` blocks are kept (enough to tell a full pool from an overfull one)."""
        now = time.monotonic() if now is None else now
        sent = self._sent.setdefault(replica, OrderedDict())
        for block_hash in block_hashes:
            sent[block_hash] = now
            sent.move_to_end(block_hash)
        while len(sent) > limit:
            sent.popitem(last=False)

    def blocks(self, replica: str, now: float | None = None) -> int:
        """Distinct blocks of the prompts sent to `replica` within the window."""
        sent = self._sent.get(replica)
        if sent is None:
            return 0
        horizon = (time.monotonic() if now is None else now) - self.window_s
        while sent and next(iter(sent.values())) <= horizon:
            sent.popitem(last=False)
        return len(sent)

    def forget(self, replica: str) -> None:
        self._sent.pop(replica, None)
