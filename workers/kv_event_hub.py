"""The relay between engine replicas and routers for KV events and load.

Replicas publish their event batches here in order; every router follows the hub with a long
poll and keeps its own copy of the index, so a routing decision never waits on the network.
The hub keeps each replica's current block set besides a bounded log of recent batches: a
follower that fell behind the log (or saw a gap) gets a snapshot instead of the batches.
"""

import asyncio
from collections import deque
from dataclasses import dataclass, field

import ray

HUB_NAME_PREFIX = "kvserve-kv-event-hub"
LOG_BATCHES = 256
LIVENESS_PERIOD_S = 1.0


def hub_name(app_name: str) -> str:
    return f"{HUB_NAME_PREFIX}-{app_name}"


@dataclass
class _ReplicaState:
    block_size: int
    hash_check: str
    actor: object = None  # the replica's actor handle, pinged for liveness
    seq: int = 0
    blocks: set = field(default_factory=set)
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_BATCHES))
    stats: dict = field(default_factory=dict)

    def apply(self, batch: dict) -> None:
        for event in batch["events"]:
            if event["type"] == "stored":
                self.blocks.update(event["block_hashes"])
            elif event["type"] == "removed":
                self.blocks.difference_update(event["block_hashes"])
            else:
                self.blocks.clear()
        self.seq = batch["seq"]
        self.log.append(batch)

    def updates_since(self, cursor: int) -> dict:
        info = {"block_size": self.block_size, "hash_check": self.hash_check, "stats": self.stats}
        oldest = self.log[0]["seq"] if self.log else self.seq + 1
        if cursor >= oldest - 1 and cursor <= self.seq:
            info["batches"] = [b for b in self.log if b["seq"] > cursor]
        else:
            info["snapshot"] = {"seq": self.seq, "blocks": list(self.blocks)}
        return info


class KVEventHub:
    """A Ray actor (the deployment builder wraps it with `ray.remote`), one per application."""

    def __init__(self):
        self.replicas: dict[str, _ReplicaState] = {}
        self.version = 0
        self._changed = asyncio.Event()
        self._watchdog: asyncio.Task | None = None

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def register(
        self, replica: str, block_size: int, hash_check: str, actor=None,
        seq: int = 0, blocks: list | None = None, stats: dict | None = None,
    ) -> None:
        """Add a replica, or start it over from a snapshot of its blocks at event `seq`."""
        state = _ReplicaState(block_size, hash_check, actor, seq, set(blocks or ()))
        state.stats = stats or {}
        self.replicas[replica] = state
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
                for replica, state in self.replicas.items() if state.actor is not None
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

    def publish(self, replica: str, batches: list[dict], stats: dict) -> bool:
        """Take a replica's next batches; False if they do not follow on or the replica is
        unknown here (the replica must then register again with a snapshot)."""
        state = self.replicas.get(replica)
        if state is None:
            return False
        state.stats = stats
        for batch in batches:
            if batch["seq"] != state.seq + 1:
                return False
            state.apply(batch)
        self._bump()
        return True

    async def follow(self, cursors: dict[str, int], version: int, timeout_s: float) -> dict:
        """Everything newer than the caller's cursors, waiting up to `timeout_s` for news."""
        if version == self.version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return {
            "version": self.version,
            "replicas": {r: s.updates_since(cursors.get(r, -1)) for r, s in self.replicas.items()},
        }
