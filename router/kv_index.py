"""Which replica holds which KV block, rebuilt from the replicas' own KV events."""

from collections.abc import Callable, Container, Set as AbstractSet
from dataclasses import dataclass

from kvserve.workers.engine.kv_events import apply_events
from kvserve.workers.protocol import BlockHash, BlockSnapshot, KVEventBatch


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
    last_seq: int
    blocks: set[BlockHash]


class KVIndex:
    """Which replica holds which KV block. Exact: it only knows what events said.

    Events of one replica must be applied in order; `apply` refuses a batch that skips a
    sequence number, and the caller then replaces that replica's state with a snapshot.
    """

    def __init__(self):
        self.replicas: dict[str, ReplicaBlocks] = {}

    def add_replica(self, replica: str, block_size: int) -> None:
        self.replicas.setdefault(replica, ReplicaBlocks(block_size, 0, set()))

    def drop_replica(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def load_snapshot(self, replica: str, block_size: int, snapshot: BlockSnapshot) -> None:
        self.replicas[replica] = ReplicaBlocks(block_size, snapshot.seq, set(snapshot.blocks))

    def apply(self, replica: str, batch: KVEventBatch) -> bool:
        """Apply one event batch; False on a sequence gap."""
        state = self.replicas.get(replica)
        if state is None or batch.seq != state.last_seq + 1:
            return False
        apply_events(state.blocks, batch.events)
        state.last_seq = batch.seq
        return True

    def prefix_matches(self, block_hashes: list[BlockHash], replicas: list[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of `block_hashes` it holds."""
        return leading_matches(block_hashes, replicas, self._blocks_of)

    def _blocks_of(self, replica: str) -> AbstractSet[BlockHash]:
        state = self.replicas.get(replica)
        return state.blocks if state is not None else _NOTHING
