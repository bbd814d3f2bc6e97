"""Which replica holds which KV block, rebuilt from the replicas' own KV events."""

from collections.abc import Callable, Container, Set as AbstractSet
from dataclasses import dataclass, field

from kvserve.workers.block_hash import BlockHash


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


@dataclass
class ReplicaBlocks:
    block_size: int
    last_seq: int = 0
    blocks: set[BlockHash] = field(default_factory=set)


class KVIndex:
    """Maps block hash -> replicas that hold it. Exact: it only knows what events said.

    Events of one replica must be applied in order; `apply` refuses a batch that skips a
    sequence number, and the caller then replaces that replica's state with a snapshot.
    """

    def __init__(self):
        self.replicas: dict[str, ReplicaBlocks] = {}
        self.holders: dict[BlockHash, set[str]] = {}

    def add_replica(self, replica: str, block_size: int) -> None:
        self.replicas.setdefault(replica, ReplicaBlocks(block_size))

    def drop_replica(self, replica: str) -> None:
        state = self.replicas.pop(replica, None)
        if state is not None:
            for block_hash in state.blocks:
                self._unlink(block_hash, replica)

    def load_snapshot(self, replica: str, block_size: int, seq: int, blocks: list[BlockHash]) -> None:
        self.drop_replica(replica)
        self.replicas[replica] = ReplicaBlocks(block_size, seq)
        self._store(replica, blocks)

    def apply(self, replica: str, batch: dict) -> bool:
        """Apply one event batch (`KVEventBatch.to_dict()` form); False on a sequence gap."""
        state = self.replicas.get(replica)
        if state is None or batch["seq"] != state.last_seq + 1:
            return False
        for event in batch["events"]:
            kind = event["type"]
            if kind == "stored":
                self._store(replica, event["block_hashes"])
            elif kind == "removed":
                for block_hash in event["block_hashes"]:
                    if block_hash in state.blocks:
                        state.blocks.discard(block_hash)
                        self._unlink(block_hash, replica)
            elif kind == "cleared":
                self.load_snapshot(replica, state.block_size, state.last_seq, [])
                state = self.replicas[replica]
        state.last_seq = batch["seq"]
        return True

    def prefix_matches(self, block_hashes: list[BlockHash], replicas: list[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of `block_hashes` it holds."""
        return leading_matches(block_hashes, replicas, self._blocks_of)

    def _blocks_of(self, replica: str) -> AbstractSet[BlockHash]:
        state = self.replicas.get(replica)
        return state.blocks if state is not None else _NOTHING

    @property
    def num_blocks(self) -> int:
        return len(self.holders)

    def _store(self, replica: str, block_hashes: list[BlockHash]) -> None:
        state = self.replicas[replica]
        for block_hash in block_hashes:
            state.blocks.add(block_hash)
            self.holders.setdefault(block_hash, set()).add(replica)

    def _unlink(self, block_hash: BlockHash, replica: str) -> None:
        holders = self.holders.get(block_hash)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self.holders[block_hash]
