"""The pool of KV blocks: reference counts, the prefix-cache map and the LRU free queue."""

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvserve.workers.engine.block_hash import BlockHash
from kvserve.workers.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class KVBlock:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


class BlockPool:
    """Owns every block. A block with no reference sits in the free queue: uncached ones at
    the front (handed out first), cached ones behind them in least-recently-freed order, so a
    cached block is evicted only when no better block is left."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.events: list[KVEvent] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self, count: int) -> list[KVBlock]:
        """Hand out `count` fresh blocks (the caller checked `num_free`), evicting as needed."""
        taken = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on blocks that may be sitting in the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks are queued for eviction in the order given."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def lookup(self, block_hashes: Sequence[BlockHash]) -> list[KVBlock]:
        """The cached blocks of the longest prefix of `block_hashes`."""
        hits = []
        for block_hash in block_hashes:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache(
        self,
        blocks: Sequence[KVBlock],
        block_hashes: Sequence[BlockHash],
        parent_hash: BlockHash | None,
        token_ids: Sequence[int],
    ) -> None:
        """Register full blocks under their hashes (`token_ids` are theirs, back to back).

        A hash already cached keeps its block. One `stored` event per unbroken run of newly
        cached blocks, so each event's parent hash and token ids describe exactly its blocks.
        """
        size = self.block_size
        run: list[BlockHash] = []
        run_start = 0
        for i, (block, block_hash) in enumerate(zip(blocks, block_hashes)):
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                self.cached[block_hash] = block
                if not run:
                    run_start = i
                run.append(block_hash)
                continue
            if run:
                self._record_stored(run, parent_hash, token_ids[run_start * size : i * size])
                run = []
            parent_hash = block_hash
        if run:
            self._record_stored(run, parent_hash, token_ids[run_start * size : (run_start + len(run)) * size])

    def _record_stored(self, run: list[BlockHash], parent: BlockHash | None, token_ids) -> None:
        self.events.append(BlockStored(run, parent, list(token_ids), self.block_size, lora_name=None))

    def reset_cache(self) -> bool:
        """Forget every cached block; only possible while no block is in use."""
        if self.num_free != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        self.events.append(AllBlocksCleared())
        return True

    def _evict(self, block: KVBlock) -> None:
        del self.cached[block.block_hash]
        self.events.append(BlockRemoved([block.block_hash]))
        block.block_hash = None
