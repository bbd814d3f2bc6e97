"""The blocks no sequence holds, in the order they are handed out again.

Uncached blocks come first (nothing is lost). Cached ones follow by retention priority, the
lowest first, least recently freed first within a priority. A priority asked for a while falls
back to the default once that passes. Most blocks are freed at the default priority: those
wait in an ordered dict, O(1) per block freed, taken or evicted; the others in heaps with lazy
deletion, O(log n) amortized.
"""

import heapq
from collections import OrderedDict
from collections.abc import Callable

from kvserve.workers.engine.retention import DEFAULT_RETENTION_PRIORITY, effective_priority


class FreeBlockQueue:
    def __init__(self, blocks: list, clock: Callable[[], float]):
        self._blocks = blocks
        self._clock = clock
        self._uncached = list(reversed(blocks))  # handed out from the end
        self._default: OrderedDict[int, int] = OrderedDict()  # block id -> free tick, at the default priority
        self._by_priority: list[tuple[int, int, int]] = []  # (priority, free tick, block id), other priorities
        self._expiries: list[tuple[float, int, int]] = []  # (expires_at, free tick, block id)
        self._tick = 0
        self._size = len(blocks)
        for block in blocks:
            block.free_tick = self._next_tick()

    def __len__(self) -> int:
        return self._size

    def __contains__(self, block) -> bool:
        return block.free_tick != 0

    def push(self, block) -> None:
        """`block` lost its last reference."""
        block.free_tick = tick = self._next_tick()
        self._size += 1
        if block.block_hash is None:
            self._uncached.append(block)
            return
        held = block.retention
        block.queued_priority = priority = DEFAULT_RETENTION_PRIORITY if held is None else effective_priority(
            held, self._clock())
        if priority == DEFAULT_RETENTION_PRIORITY:
            self._default[block.block_id] = tick
            return
        heapq.heappush(self._by_priority, (block.queued_priority, tick, block.block_id))
        if held.expires_at is not None:
            heapq.heappush(self._expiries, (held.expires_at, tick, block.block_id))
        self._compact_if_stale()

    def remove(self, block) -> None:
        """`block`, a cached block in the queue, is taken again (a prefix hit)."""
        block.free_tick = 0
        self._size -= 1
        self._default.pop(block.block_id, None)

    def pop(self):
        """The next block to hand out: removed from the queue, still holding its hash."""
        if self._uncached:
            block = self._uncached.pop()
        else:
            self._demote_expired()
            block = self._blocks[self._next_cached()]
        block.free_tick = 0
        self._size -= 1
        return block

    def reset(self) -> None:
        """Every block is free and uncached (the prefix cache was cleared)."""
        self.__init__(self._blocks, self._clock)

    def _next_cached(self) -> int:
        """Remove and return the id of the cached block to hand out next."""
        heap, default = self._by_priority, self._default
        while heap and not self._is_live(*heap[0]):
            heapq.heappop(heap)
        if default and (not heap or (DEFAULT_RETENTION_PRIORITY, next(iter(default.values()))) < heap[0][:2]):
            return default.popitem(last=False)[0]
        return heapq.heappop(heap)[2]

    def _is_live(self, priority: int, tick: int, block_id: int) -> bool:
        block = self._blocks[block_id]
        return block.free_tick == tick and block.queued_priority == priority

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _demote_expired(self) -> None:
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, tick, block_id = heapq.heappop(self._expiries)
            block = self._blocks[block_id]
            if block.free_tick == tick and block.queued_priority != DEFAULT_RETENTION_PRIORITY:
                block.queued_priority = DEFAULT_RETENTION_PRIORITY
                heapq.heappush(self._by_priority, (DEFAULT_RETENTION_PRIORITY, tick, block_id))

    def _compact_if_stale(self) -> None:
        """Drop the entries of blocks taken again since they were queued, once they outnumber
        the blocks: a block kept at a high priority and hit over and over would pile them up."""
        if len(self._by_priority) + len(self._expiries) <= 2 * len(self._blocks) + 64:
            return
        live = [b for b in self._blocks if b.free_tick and b.block_hash is not None and b.block_id not in self._default]
        self._by_priority = [(b.queued_priority, b.free_tick, b.block_id) for b in live]
        self._expiries = [(b.retention.expires_at, b.free_tick, b.block_id) for b in live
                          if b.queued_priority != DEFAULT_RETENTION_PRIORITY and b.retention.expires_at is not None]
        heapq.heapify(self._by_priority)
        heapq.heapify(self._expiries)
