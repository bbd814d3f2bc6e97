"""What this router sent to each replica, block by block, and when.

Two things follow from it. The working set: a pool full of blocks nobody has asked for in a
while costs little to overwrite; a pool whose blocks are still wanted by ongoing
conversations or hot prefixes loses hits with every new prefix it takes. The index says what
a replica holds, not which of it is still wanted; the distinct blocks sent there within the
last `window_s` say which is. And the recent matches: a request's blocks enter the index only
once its replica has scheduled it and the events have come back through the hub, so a
follow-up sent meanwhile (the next turn of a conversation, a burst on a new shared prefix)
would find no holder; the blocks sent in the last few seconds send it after the first.

It counts this router's own decisions; with several ingress replicas each sees its share of
the traffic, in the same proportions.
"""

import time
from collections import OrderedDict

from kvserve.router.kv_index import leading_matches
from kvserve.workers.engine.block_hash import BlockHash


class _SentSince:
    """The blocks of one replica sent after `since`, as a container for `leading_matches`."""

    def __init__(self, sent: dict[BlockHash, float], since: float):
        self.sent, self.since = sent, since

    def __contains__(self, block_hash: BlockHash) -> bool:
        return self.sent.get(block_hash, self.since) > self.since


class WorkingSets:
    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._sent: dict[str, OrderedDict[BlockHash, float]] = {}  # last sent, oldest first

    def add(self, replica: str, block_hashes: list[BlockHash], limit: int | None, now: float | None = None) -> None:
        """A prompt with this chain of blocks went to `replica`; of what was sent there, at
        most the newest `limit` blocks are kept (enough to tell a full pool from an overfull
        one; None: all within the window)."""
        now = time.monotonic() if now is None else now
        sent = self._sent.setdefault(replica, OrderedDict())
        for block_hash in block_hashes:
            sent[block_hash] = now
            sent.move_to_end(block_hash)
        while limit is not None and len(sent) > limit:
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

    def recent_matches(
        self, block_hashes: list[BlockHash], replicas: list[str], within_s: float, now: float | None = None
    ) -> dict[str, int]:
        """For each replica, how many leading blocks of `block_hashes` were sent there within
        the last `within_s` (no longer than the window)."""
        since = (time.monotonic() if now is None else now) - within_s
        return leading_matches(block_hashes, replicas, lambda r: _SentSince(self._sent.get(r, {}), since))

    def forget(self, replica: str) -> None:
        self._sent.pop(replica, None)
