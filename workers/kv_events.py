"""KV cache events, in the shape vLLM publishes them, so external indexers can read them too."""

from dataclasses import asdict, dataclass, field

from kvserve.workers.block_hash import BlockHash


@dataclass
class BlockStored:
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    type: str = "stored"


@dataclass
class BlockRemoved:
    block_hashes: list[BlockHash]
    type: str = "removed"


@dataclass
class AllBlocksCleared:
    type: str = "cleared"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass
class KVEventBatch:
    """Events in the order they happened; `seq` grows by one per batch of one replica."""

    seq: int
    events: list[KVEvent] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"seq": self.seq, "events": [asdict(e) for e in self.events]}
