"""The relay between engine replicas and routers for KV events and load.

Replicas publish their event batches here in order; every router follows the hub with a long
poll and keeps its own copy of the index, so a routing decision never waits on the network.
An application has `serving.kv_event_hubs` of them, each relaying the replicas `hub_of` gives
it: at hundreds of replicas one actor cannot take every replica's publishes and answer every
router.
The hub keeps each replica's current block set besides a bounded log of recent batches: a
follower that fell behind the log (or saw a gap, or follows another epoch) gets a snapshot
instead of the batches.

Each registration starts an epoch of the replica (one start of its engine). Batches and
heartbeats of any other epoch are fenced: counted, never applied. A batch that skips a
sequence number, or a heartbeat whose block count disagrees with the hub's copy, makes the
hub forget the replica until it registers again with a snapshot.
"""

import asyncio
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from itertools import islice

import ray

from kvserve.workers.protocol import (
    BlockHash, BlockSnapshot, Heartbeat, HubNews, KVCursor, KVEventBatch, ReplicaNews, ReplicaRegistration,
)
from kvserve.workers.engine.kv_events import apply_events

HUB_NAME_PREFIX = "kvserve-kv-event-hub"
LOG_BATCHES = 256
LIVENESS_PERIOD_S = 1.0
FOLLOWER_SILENCE_S = 10.0  # a follower polls at least every few seconds; one silent this long is gone


def hub_name(app_name: str, hub: int = 0) -> str:
    """The actor name of the application's hub number `hub` (of `serving.kv_event_hubs`)."""
    return f"{HUB_NAME_PREFIX}-{app_name}" if hub == 0 else f"{HUB_NAME_PREFIX}-{app_name}-{hub}"


def hub_of(replica: str, hubs: int) -> int:
    """The hub of `hubs` that relays the events of `replica`: every replica and every follower
    work it out alike (a stable hash of the name, not Python's salted one)."""
    return zlib.crc32(replica.encode()) % hubs


@dataclass
class _ReplicaState:
    block_size: int
    hash_check: str
    actor: object  # the replica's actor handle, pinged for liveness
    epoch: int
    seq: int
    blocks: set[BlockHash]
    heartbeat: Heartbeat
    log: deque[KVEventBatch] = field(default_factory=lambda: deque(maxlen=LOG_BATCHES))

    @classmethod
    def of(cls, registration: ReplicaRegistration) -> "_ReplicaState":
        snapshot = registration.snapshot
        return cls(registration.block_size, registration.hash_check, registration.actor,
                   snapshot.epoch, snapshot.seq, set(snapshot.blocks), registration.heartbeat)

    def apply(self, batch: KVEventBatch) -> None:
        apply_events(self.blocks, batch.events)
        self.seq = batch.seq
        self.log.append(batch)

    def agrees(self, heartbeat: Heartbeat) -> bool:
        """The heartbeat's position and block count are the hub's copy's (a late one, from
        before the batches already applied, says nothing)."""
        return heartbeat.seq < self.seq or (heartbeat.seq == self.seq and heartbeat.num_blocks == len(self.blocks))

    def news_since(self, cursor: KVCursor | None) -> ReplicaNews | None:
        """What a follower at `cursor` lacks of this replica; None: nothing."""
        oldest = self.log[0].seq if self.log else self.seq + 1
        if cursor is not None and cursor.epoch == self.epoch and oldest - 1 <= cursor.seq <= self.seq:
            if cursor.seq == self.seq and cursor.heard == self.heartbeat.sent_at:
                return None
            # The log's seqs run without a gap up to `seq`: the batches after the cursor are
            # its last few, found from its end (not a pass over the log for every follower).
            batches = list(islice(reversed(self.log), self.seq - cursor.seq))[::-1]
            return ReplicaNews(self.block_size, self.hash_check, self.heartbeat, batches, None)
        snapshot = BlockSnapshot(self.epoch, self.seq, list(self.blocks))
        return ReplicaNews(self.block_size, self.hash_check, self.heartbeat, None, snapshot)


class KVEventHub:
    """A Ray actor (the deployment builder wraps it with `ray.remote`), one per application."""

    def __init__(self, clock=time.monotonic):
        self.replicas: dict[str, _ReplicaState] = {}
        self.followers: dict[str, float] = {}  # when each follower last polled
        self.clock = clock
        self.version = 0
        self.fenced_batches = 0  # batches of an epoch other than the registered one
        self._changed = asyncio.Event()
        self._watchdog: asyncio.Task | None = None

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def register(self, registration: ReplicaRegistration) -> None:
        """Add a replica, or start it over from a snapshot of its blocks."""
        self.replicas[registration.replica] = _ReplicaState.of(registration)
        self._bump()
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._drop_dead_replicas())

    async def _drop_dead_replicas(self) -> None:
        """A killed replica never says goodbye: ping them all and forget those that are gone.
        A slow answer is not death (Serve's health checks deal with hung replicas)."""
        while True:
            await asyncio.sleep(LIVENESS_PERIOD_S)
            pings = {
                replica: asyncio.ensure_future(state.actor.__ray_ready__.remote())
                for replica, state in self.replicas.items()
            }
            if pings:
                await asyncio.wait(pings.values(), timeout=10 * LIVENESS_PERIOD_S)
            for replica, ping in pings.items():
                if not ping.done():
                    ping.cancel()
                elif isinstance(ping.exception(), ray.exceptions.ActorDiedError):
                    self.unregister(replica)

    def unregister(self, replica: str) -> None:
        if self.replicas.pop(replica, None) is not None:
            self._bump()

    def publish(self, replica: str, batches: list[KVEventBatch], heartbeat: Heartbeat) -> bool:
        """Take a replica's next batches and its heartbeat (the position after them); False if
        the replica must register again with a snapshot: it is unknown here, of another epoch,
        or its batches skip one or leave a block count other than the heartbeat's."""
        state = self.replicas.get(replica)
        if state is None:
            return False
        fenced = [batch for batch in batches if batch.epoch != state.epoch]
        self.fenced_batches += len(fenced)
        if fenced or heartbeat.epoch != state.epoch:
            return False
        for batch in batches:
            if batch.seq == state.seq + 1:  # a repeat is skipped; after a gap the heartbeat disagrees
                state.apply(batch)
        if not state.agrees(heartbeat):
            return self._lose(replica)
        if heartbeat.seq >= state.heartbeat.seq:
            state.heartbeat = heartbeat
        self._bump()
        return True

    def _lose(self, replica: str) -> bool:
        """Forget a replica whose copy can no longer be trusted, until it registers again."""
        self.unregister(replica)
        return False

    async def follow(self, follower: str | None, cursors: dict[str, KVCursor], version: int,
                     timeout_s: float) -> HubNews:
        """Everything newer than the cursors of `follower` (a router's id; None: a reader that
        routes nothing), waiting up to `timeout_s` for news; and how many routers polled
        within `FOLLOWER_SILENCE_S`. A replica with nothing new is only named: while the
        replicas publish every few milliseconds between them, most answers carry a few."""
        if follower is not None:
            self.followers[follower] = self.clock()
        if version == self.version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        news = {r: n for r, s in self.replicas.items() if (n := s.news_since(cursors.get(r))) is not None}
        return HubNews(self.version, news, self._count_followers(), frozenset(self.replicas))

    def _count_followers(self) -> int:
        since = self.clock() - FOLLOWER_SILENCE_S
        for gone in [f for f, polled in self.followers.items() if polled < since]:
            del self.followers[gone]
        return len(self.followers)
