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
the traffic, and the scorer takes the replica's own count of its working set where that is
more (`workers/engine/working_set.py`).
"""

import bisect
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass
from itertools import count, repeat
from operator import attrgetter

import numpy as np

from kvserve.router.replica_table import ReplicaCounter
from kvserve.workers.engine.block_hash import BlockHash


@dataclass(slots=True)
class _Send:
    """One prompt sent to a replica: its blocks, of which the first `kept` are still counted."""

    number: int
    at: float
    blocks: list[BlockHash]
    kept: int


class WorkingSets:
    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._numbers = count()
        # Per replica: each block's last send (its number), and the sends in order. A send's
        # blocks leave when it expires, unless sent again since: one dict update per prompt,
        # no per-block reordering.
        self._last_send: dict[str, dict[BlockHash, int]] = {}
        self._sizes = ReplicaCounter()  # the length of each replica's `_last_send`
        self._sends: dict[str, deque[_Send]] = {}
        self._timeline: deque[tuple[str, _Send]] = deque()  # every replica's sends, oldest first
        # The replicas sent each chain's first block (a hash that only ever starts a chain),
        # so that a recent match searches those alone.
        self._heads: dict[BlockHash, set[str]] = {}

    def add(self, replica: str, block_hashes: list[BlockHash], limit: int | None, now: float | None = None) -> None:
        """A prompt with this chain of blocks went to `replica`; of what was sent there, at
        most `limit` blocks are kept, the oldest sends' tails dropped first (enough to tell a
        full pool from an overfull one; None: all within the window)."""
        if not block_hashes:
            return
        send = _Send(next(self._numbers), self.clock() if now is None else now, block_hashes, len(block_hashes))
        last_send = self._last_send.setdefault(replica, {})
        last_send.update(zip(block_hashes, repeat(send.number)))
        self._sends.setdefault(replica, deque()).append(send)
        self._timeline.append((replica, send))
        self._heads.setdefault(block_hashes[0], set()).add(replica)
        while limit is not None and len(last_send) > limit:
            self._drop_block(replica, self._sends[replica][0])
        self._sizes[replica] = len(last_send)

    def _drop_block(self, replica: str, send: _Send) -> None:
        """Drop the last block still counted of `send`, the oldest send there."""
        send.kept -= 1
        block_hash = send.blocks[send.kept]
        last_send = self._last_send[replica]
        if last_send.get(block_hash) == send.number:
            del last_send[block_hash]
            if send.kept == 0:
                self._unhead(replica, block_hash)
        if send.kept == 0:
            self._sends[replica].popleft()

    def _unhead(self, replica: str, block_hash: BlockHash) -> None:
        senders = self._heads.get(block_hash)
        if senders is not None:
            senders.discard(replica)
            if not senders:
                del self._heads[block_hash]

    def blocks(self, replica: str, now: float | None = None) -> int:
        """Distinct blocks of the prompts sent to `replica` within the window."""
        return int(self.sizes([replica], now)[0])

    def sizes(self, replicas: list[str], now: float | None = None) -> np.ndarray:
        """`blocks` of each of `replicas`, with one look at the clock."""
        self._expire((self.clock() if now is None else now) - self.window_s)
        return self._sizes.of(replicas)

    def _expire(self, horizon: float) -> None:
        """Forget the sends made at or before `horizon`, to any replica: a replica's sends
        leave in the order they came, each unless the blocks limit dropped it already."""
        timeline = self._timeline
        while timeline and timeline[0][1].at <= horizon:
            replica, send = timeline.popleft()
            sends = self._sends.get(replica)
            if sends and sends[0] is send:
                self._forget_send(replica, sends.popleft())

    def _forget_send(self, replica: str, send: _Send) -> None:
        """Forget a send that left the window: those of its blocks not sent again since. A
        later prompt with one of its blocks held every block before it, so the blocks sent
        again lead the chain: a binary search finds where they end, and only the tail after
        them is visited (a conversation's history, re-sent with every turn, is skipped)."""
        last_send, number = self._last_send[replica], send.number
        resent = bisect.bisect_left(send.blocks, True, 0, send.kept, key=lambda h: last_send.get(h) == number)
        for block_hash in send.blocks[resent : send.kept]:
            del last_send[block_hash]
        if send.kept and send.blocks[0] not in last_send:
            self._unhead(replica, send.blocks[0])
        self._sizes[replica] = len(last_send)

    def wanted_among(self, replica: str, block_hashes: set[BlockHash]) -> int:
        """How many of `block_hashes` are in `replica`'s working set (as of the last `sizes`)."""
        last_send = self._last_send.get(replica, {})
        return sum(1 for block_hash in block_hashes if block_hash in last_send)

    def recent_matches(
        self, block_hashes: list[BlockHash], replicas: Container[str], within_s: float,
        beyond: dict[str, int] | None = None, now: float | None = None,
    ) -> dict[str, int]:
        """For each of `replicas` sent the first of `block_hashes` within the last `within_s`
        (no longer than the window), how many leading blocks were sent there within that time,
        where more than `beyond` gives it (0 for a replica absent there); the others are left
        out. Only the replicas sent the first block are searched: at hundreds of replicas,
        most were not. Every prompt sent with a block
        held the blocks before it, so a block's last send is no older than the next block's,
        and no newer than the previous one's: the recent blocks of a chain lead it (kept so
        by dropping a send's tail first). So one lookup, of the block after a replica's
        `beyond` depth, tells whether it goes deeper, and a binary search finds where its
        recent blocks end."""
        since = (self.clock() if now is None else now) - within_s
        beyond = beyond or {}
        matched = {}
        if not block_hashes:
            return matched
        for replica in self._heads.get(block_hashes[0], ()):
            floor = beyond.get(replica, 0)
            if floor >= len(block_hashes) or replica not in replicas:
                continue
            sends, last_send = self._sends[replica], self._last_send[replica]
            number = last_send.get(block_hashes[floor])
            if number is None or sends[-1].at <= since:
                continue
            recent = sends[bisect.bisect_right(sends, since, key=attrgetter("at"))].number  # the first send since
            if number >= recent:
                matched[replica] = bisect.bisect_left(block_hashes, True, floor + 1,
                                                      key=lambda h: last_send.get(h, -1) < recent)
        return matched

    def withdraw(self, replica: str, block_hashes: list[BlockHash]) -> None:
        """Take back the latest send of this chain of blocks to `replica` (the replica refused
        the request, so it cached none of it): its blocks count as last sent by the earlier
        sends there that share them, or leave. Sends share a chain's leading blocks only, so
        the newest earlier send claims the blocks it shares, the next one those beyond, and
        so on (rare, and only the replica's sends are visited)."""
        sends = self._sends.get(replica)
        withdrawn = next((send for send in reversed(sends or ()) if send.blocks == block_hashes), None)
        if withdrawn is None:
            return
        sends.remove(withdrawn)
        last_send, end = self._last_send[replica], withdrawn.kept
        claimed = bisect.bisect_left(block_hashes, True, 0, end, key=lambda h: last_send.get(h) == withdrawn.number)
        for earlier in reversed(sends):
            if claimed == end:
                break
            shared = min(earlier.kept, end)
            if (earlier.number > withdrawn.number or shared <= claimed
                    or earlier.blocks[claimed] != block_hashes[claimed]):
                continue
            blocks = earlier.blocks
            shared = bisect.bisect_left(range(shared), True, claimed, key=lambda k: blocks[k] != block_hashes[k])
            last_send.update(zip(block_hashes[claimed:shared], repeat(earlier.number)))
            claimed = shared
        self._forget_send(replica, withdrawn)  # the blocks no earlier send claimed

    def forget(self, replica: str) -> None:
        for block_hash in self._last_send.pop(replica, ()):
            self._unhead(replica, block_hash)
        self._sizes.drop(replica)
        self._sends.pop(replica, None)
