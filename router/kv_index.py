"""Which replica holds which KV block, rebuilt from the replicas' own KV events."""

from collections.abc import Callable, Container, Set as AbstractSet
from dataclasses import dataclass
from enum import Enum

from kvserve.workers.engine.kv_events import apply_events
from kvserve.workers.protocol import (
    HEARTBEAT_PERIOD_S, MISSED_HEARTBEATS, BlockHash, BlockSnapshot, Heartbeat, KVEventBatch,
)

SILENCE_S = MISSED_HEARTBEATS * HEARTBEAT_PERIOD_S


_NOTHING: frozenset[BlockHash] = frozenset()


def leading_matches(
    block_hashes: list[BlockHash], replicas: list[str], held_by: Callable[[str], Container[BlockHash]]
) -> dict[str, int]:
    """For each replica, how many leading blocks of `block_hashes` are in `held_by(replica)`.
    One walk per replica, stopping at its first miss: most replicas miss the first block."""
    matched = {}
    for replica in replicas:
        held = held_by(replica)
        depth = 0
        for block_hash in block_hashes:
            if block_hash not in held:
                break
            depth += 1
        matched[replica] = depth
    return matched


class Fate(Enum):
    """What became of one event batch offered to the index."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already applied
    GAP = "gap"  # a batch before it is missing
    FENCED = "fenced"  # of another epoch than the replica's state


@dataclass
class ReplicaBlocks:
    block_size: int
    epoch: int
    last_seq: int
    blocks: set[BlockHash]
    heartbeat: Heartbeat
    heard_at: float  # when `heartbeat` arrived, by the caller's clock


class KVIndex:
    """Which replica holds which KV block. Exact: it only knows what events said.

    A replica's state starts from a snapshot of one epoch and follows only that epoch's
    batches, in order. The caller drops a replica whose state can no longer be trusted (a gap,
    a heartbeat that disagrees, a new epoch) and loads a snapshot again. A replica without
    state, or whose last heartbeat is older than SILENCE_S, is unknown: it matches nothing.
    """

    def __init__(self):
        self.replicas: dict[str, ReplicaBlocks] = {}

    def drop_replica(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def load_snapshot(self, replica: str, block_size: int, snapshot: BlockSnapshot, heartbeat: Heartbeat,
                      now: float) -> None:
        self.replicas[replica] = ReplicaBlocks(block_size, snapshot.epoch, snapshot.seq, set(snapshot.blocks),
                                               heartbeat, now)

    def apply(self, replica: str, batch: KVEventBatch) -> Fate:
        state = self.replicas.get(replica)
        if state is None:
            return Fate.GAP
        if batch.epoch != state.epoch:
            return Fate.FENCED
        if batch.seq <= state.last_seq:
            return Fate.DUPLICATE
        if batch.seq > state.last_seq + 1:
            return Fate.GAP
        apply_events(state.blocks, batch.events)
        state.last_seq = batch.seq
        return Fate.APPLIED

    def hear(self, replica: str, heartbeat: Heartbeat, now: float) -> bool:
        """Take a heartbeat; False if it contradicts the replica's state (another epoch, a
        position past the last batch applied, or another block count at that position)."""
        state = self.replicas[replica]
        if heartbeat.epoch != state.epoch or heartbeat.seq > state.last_seq:
            return False
        if heartbeat.seq == state.last_seq and heartbeat.num_blocks != len(state.blocks):
            return False
        if heartbeat != state.heartbeat and heartbeat.seq >= state.heartbeat.seq:
            state.heartbeat, state.heard_at = heartbeat, now
        return True

    def known(self, replicas: list[str], now: float) -> list[str]:
        """Those of `replicas` whose state is current: loaded, and heard from recently."""
        return [r for r in replicas if (state := self.replicas.get(r)) is not None and now - state.heard_at <= SILENCE_S]

    def prefix_matches(self, block_hashes: list[BlockHash], replicas: list[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of `block_hashes` it holds."""
        return leading_matches(block_hashes, replicas, self._blocks_of)

    def _blocks_of(self, replica: str) -> AbstractSet[BlockHash]:
        state = self.replicas.get(replica)
        return state.blocks if state is not None else _NOTHING
