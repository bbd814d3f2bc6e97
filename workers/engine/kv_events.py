"""KV cache events, in the shape vLLM publishes them, so external indexers can read them too.

Whoever keeps a copy of a replica's block set (the KV event hub, every router's index)
applies the replica's events with `apply_events`, the one definition of what each means.
That block set is the device's (`medium` "gpu"); events of the host tier ("cpu") leave it
alone, for readers that follow the tiers.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from kvserve.workers.engine.block_hash import BlockHash

DEVICE_MEDIUM = "gpu"
HOST_MEDIUM = "cpu"


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None
    medium: str  # DEVICE_MEDIUM or HOST_MEDIUM
    priority: int  # the blocks' retention priority when stored (retention.py: 0-100, 35 unless asked)

    def apply_to(self, blocks: set[BlockHash], medium: str = DEVICE_MEDIUM) -> None:
        if self.medium == medium:
            blocks.update(self.block_hashes)


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[BlockHash]
    medium: str

    def apply_to(self, blocks: set[BlockHash], medium: str = DEVICE_MEDIUM) -> None:
        if self.medium == medium:
            blocks.difference_update(self.block_hashes)


@dataclass(frozen=True)
class AllBlocksCleared:
    """Every cached block of every tier is gone (a reset of the prefix cache)."""

    def apply_to(self, blocks: set[BlockHash], medium: str = DEVICE_MEDIUM) -> None:
        blocks.clear()


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class KVEventBatch:
    """Events in the order they happened. `epoch` names one start of the engine (its cache
    starts empty), `seq` grows by one per batch within it, `ts` is the wall time it was taken."""

    epoch: int
    seq: int
    ts: float
    events: list[KVEvent]


@dataclass(frozen=True)
class BlockSnapshot:
    """An engine's whole block set as of its event batch `seq` of `epoch`."""

    epoch: int
    seq: int
    blocks: list[BlockHash]


def apply_events(blocks: set[BlockHash], events: Iterable[KVEvent], medium: str = DEVICE_MEDIUM) -> None:
    """Bring a copy of a replica's block set in one tier (the device's unless said) up to date
    with its events, in order."""
    for event in events:
        event.apply_to(blocks, medium)
