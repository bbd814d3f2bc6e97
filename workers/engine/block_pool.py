"""A pool of KV blocks: reference counts, the prefix-cache map, retention asks and the free queue."""

import time
from collections.abc import Callable, Iterable, Sequence

from kvserve.workers.engine.block_hash import BlockHash
from kvserve.workers.engine.free_queue import FreeBlockQueue
from kvserve.workers.engine.kv_events import DEVICE_MEDIUM, HOST_MEDIUM, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvserve.workers.engine.retention import RetentionAsk, effective_priority, stronger


class KVBlock:
    __slots__ = ("block_id", "on_host", "ref_count", "block_hash", "parent_hash", "token_ids", "retention",
                 "lora_name", "free_tick", "queued_priority")

    def __init__(self, block_id: int, on_host: bool = False):
        self.block_id = block_id
        self.on_host = on_host
        self.ref_count = 0
        self.block_hash: BlockHash | None = None
        self.parent_hash: BlockHash | None = None  # with token_ids, what a `stored` event of it says
        self.token_ids: Sequence[int] = ()
        self.retention: RetentionAsk | None = None  # the strongest ask since it was cached
        self.lora_name: str | None = None  # the LoRA adapter its KV was computed under
        self.free_tick = 0  # when it joined the free queue; 0 while held
        self.queued_priority = 0

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


class BlockPool:
    """Owns every block of one medium ("gpu": the device's cache, "cpu": the host tier). A
    block with no reference sits in the free queue (`FreeBlockQueue`): a cached block is
    evicted only when no uncached one is left, the lowest retention priority first.
    `on_evict` sees each cached block just before it loses its hash."""

    def __init__(self, num_blocks: int, block_size: int, medium: str = DEVICE_MEDIUM,
                 clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[KVBlock], None] | None = None):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.medium = medium
        self.clock = clock
        self.on_evict = on_evict
        self.blocks = [KVBlock(i, medium == HOST_MEDIUM) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks, clock)
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
            block = self.free_queue.pop()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on blocks that may be sitting in the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks are queued for eviction in the order given."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue.push(block)

    def ask(self, blocks: Iterable[KVBlock], asks: Iterable[RetentionAsk]) -> None:
        """Raise the retention of cached blocks (one ask each) to what is asked, if stronger."""
        now = self.clock()
        for block, asked in zip(blocks, asks):
            if block.block_hash is not None and stronger(asked, block.retention, now):
                block.retention = asked

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
        asks: Sequence[RetentionAsk | None],
        lora_name: str | None = None,
    ) -> None:
        """Register full blocks under their hashes (`token_ids` are theirs, back to back), each
        with its retention ask (None: the default), computed under LoRA adapter `lora_name`.

        A hash already cached keeps its block. One `stored` event per unbroken run of newly
        cached blocks of one priority, so each event's parent hash, token ids and priority
        describe exactly its blocks.
        """
        size = self.block_size
        now = self.clock()
        run: list[KVBlock] = []
        for i, (block, block_hash, asked) in enumerate(zip(blocks, block_hashes, asks)):
            if block.block_hash is None and block_hash not in self.cached:
                self._register(block, block_hash, parent_hash, token_ids[i * size : (i + 1) * size], asked, lora_name)
                if run and effective_priority(run[-1].retention, now) != effective_priority(asked, now):
                    self._record_stored(run)
                    run = []
                run.append(block)
            elif run:
                self._record_stored(run)
                run = []
            parent_hash = block_hash
        if run:
            self._record_stored(run)

    def cache_copy(self, block: KVBlock, source: KVBlock) -> None:
        """Register `block` as holding what cached `source` (of another pool) holds."""
        self._register(block, source.block_hash, source.parent_hash, source.token_ids, source.retention,
                       source.lora_name)
        self._record_stored([block])

    def _register(self, block: KVBlock, block_hash: BlockHash, parent_hash: BlockHash | None,
                  token_ids: Sequence[int], asked: RetentionAsk | None, lora_name: str | None) -> None:
        block.block_hash = block_hash
        block.lora_name = lora_name
        block.parent_hash = parent_hash
        block.token_ids = token_ids
        block.retention = asked
        self.cached[block_hash] = block

    def _record_stored(self, run: list[KVBlock]) -> None:
        priority = effective_priority(run[0].retention, self.clock())
        token_ids = [t for block in run for t in block.token_ids]
        self.events.append(BlockStored([b.block_hash for b in run], run[0].parent_hash, token_ids, self.block_size,
                                       lora_name=run[0].lora_name, medium=self.medium, priority=priority))

    def reset_cache(self) -> bool:
        """Forget every cached block; only possible while no block is in use."""
        if self.num_free != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
            block.retention = None
        self.cached.clear()
        self.free_queue.reset()
        self.events.append(AllBlocksCleared())
        return True

    def forget_adapter(self, lora_name: str) -> None:
        """Uncache every block computed under LoRA adapter `lora_name`, so that the name served
        again from other weights never finds them; blocks in use keep their contents."""
        for block in [b for b in self.cached.values() if b.lora_name == lora_name]:
            del self.cached[block.block_hash]
            self.events.append(BlockRemoved([block.block_hash], medium=self.medium))
            block.block_hash = None
            block.retention = None

    def _evict(self, block: KVBlock) -> None:
        if self.on_evict is not None:
            self.on_evict(block)
        del self.cached[block.block_hash]
        self.events.append(BlockRemoved([block.block_hash], medium=self.medium))
        block.block_hash = None
        block.retention = None
