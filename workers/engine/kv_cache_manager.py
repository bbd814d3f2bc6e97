"""Per-sequence block tables over the device's block pool, with prefix caching, retention
priorities, the host tier and KV events."""

import secrets
import time
from dataclasses import dataclass

from kvserve.workers.engine.block_hash import BlockHash, extend_block_chain
from kvserve.workers.engine.block_pool import BlockPool, KVBlock
from kvserve.workers.engine.kv_events import HOST_MEDIUM, BlockSnapshot, KVEventBatch
from kvserve.workers.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class BlockTransfer:
    """Copy block `src` to block `dst` between the device's cache and the host tier, before
    the next forward pass; transfers run in the order given."""

    to_host: bool
    src: int
    dst: int


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def check_pool_holds_a_sequence(num_blocks: int, block_size: int, max_model_len: int) -> None:
    """Raise ValueError if a pool of `num_blocks` cannot hold one sequence of `max_model_len`."""
    if num_blocks < blocks_for(max_model_len, block_size):
        raise ValueError(
            f"the KV pool ({num_blocks} blocks of {block_size} tokens) cannot hold one sequence of "
            f"max_model_len {max_model_len}: raise num_kv_blocks, kv_cache_memory_gib or "
            "gpu_memory_utilization, or lower max_model_len"
        )


class KVCacheManager:
    """With `num_host_blocks`, a cached block evicted from the device is copied to the host
    tier (unless already there), and a prefix found there is copied back into fresh device
    blocks before the request's prefill; the copies wait in `transfers` for the executor."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, on_evict=self._offload if num_host_blocks else None)
        self.host = BlockPool(num_host_blocks, block_size, HOST_MEDIUM, self.pool.clock) if num_host_blocks else None
        self.transfers: list[BlockTransfer] = []
        self.num_host_hit_blocks = 0
        self.num_loaded_blocks = 0  # copied back from the host tier
        self.num_offloaded_blocks = 0  # copied out to the host tier
        self.seq_blocks: dict[str, list[KVBlock]] = {}
        self.block_tables: dict[str, list[int]] = {}
        self.num_hashed_blocks: dict[str, int] = {}
        self.grown: list[str] = []  # sequences whose block tables gained blocks since `take_grown`
        self.epoch = secrets.randbits(63)  # a fresh cache: readers of older events must start over
        self._event_seq = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        return len(self.pool.cached)

    def cached_block_hashes(self) -> list[BlockHash]:
        return list(self.pool.cached)

    @property
    def num_host_cached_blocks(self) -> int:
        return len(self.host.cached) if self.host else 0

    def get_computed_blocks(self, seq: Sequence) -> list[KVBlock]:
        """Cached blocks holding a prefix of `seq`, leaving at least one token to compute: the
        device's, each followed where it ends by the host tier's (`on_host`). A prompt that
        needs every token's hidden state (mean pooling, prompt logprobs) reads none."""
        if (not self.enable_prefix_caching or (seq.pooled is not None and not seq.pooled.reads_cached_prefix)
                or seq.params.prompt_logprobs is not None):
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        hashes = seq.block_hashes[:max_blocks]
        hits = self.pool.lookup(hashes)
        while self.host and len(hits) < max_blocks:
            rest = hashes[len(hits):]
            more = self.host.lookup(rest) or self.pool.lookup(rest)
            if not more:
                break
            hits += more
        return hits

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: list[KVBlock] = ()
    ) -> bool:
        """Give `seq` room for `num_new_tokens` more tokens after its computed ones (and after
        `computed_blocks`, a cache hit being admitted with it). False, changing nothing, if
        the pool is too short."""
        if not computed_blocks:
            if seq.num_computed_tokens + num_new_tokens < seq.kv_quiet_below:
                return True
            if self._fits(seq, num_new_tokens):
                return True
        blocks = self.seq_blocks.setdefault(seq.seq_id, [])
        num_cached = len(computed_blocks) * self.block_size
        total = seq.num_computed_tokens + num_cached + num_new_tokens
        on_device = [b for b in computed_blocks if not b.on_host]
        on_host = [b for b in computed_blocks if b.on_host]
        needed = blocks_for(total, self.block_size) - len(blocks) - len(on_device)
        reclaimable = sum(1 for b in on_device if b.ref_count == 0)
        if needed > self.pool.num_free - reclaimable:
            if not blocks:
                self._forget(seq)
            return False
        self.pool.touch(on_device)
        if on_host:
            self.host.touch(on_host)  # kept while device blocks are taken: evictions offload
        fresh = self.pool.take(needed) if needed > 0 else []
        placed = [self._load(b, fresh.pop(0)) if b.on_host else b for b in computed_blocks]
        if on_host:
            self.host.release(on_host)
            self.num_host_hit_blocks += len(on_host)
        blocks.extend(placed + fresh)
        self.block_tables.setdefault(seq.seq_id, []).extend(b.block_id for b in placed + fresh)
        if placed or fresh:
            self.grown.append(seq.seq_id)
        if self.enable_prefix_caching:
            self._cache_full_blocks(seq, total)
        self._note_quiet(seq)
        return True

    def _load(self, host_block: KVBlock, device_block: KVBlock) -> KVBlock:
        self.transfers.append(BlockTransfer(False, host_block.block_id, device_block.block_id))
        self.num_loaded_blocks += 1
        return device_block

    def _offload(self, block: KVBlock) -> None:
        """`block` is leaving the device: keep a copy in the host tier if there is room."""
        if block.block_hash in self.host.cached or self.host.num_free == 0:
            return
        (copy,) = self.host.take(1)
        self.host.cache_copy(copy, block)
        self.host.release([copy])
        self.transfers.append(BlockTransfer(True, block.block_id, copy.block_id))
        self.num_offloaded_blocks += 1

    def forget_adapter(self, lora_name: str) -> None:
        """Uncache, in both tiers, the blocks computed under LoRA adapter `lora_name`."""
        for pool in (self.pool, self.host) if self.host else (self.pool,):
            pool.forget_adapter(lora_name)

    def take_grown(self) -> list[str]:
        grown, self.grown = self.grown, []
        return grown

    def take_transfers(self) -> list[BlockTransfer]:
        transfers, self.transfers = self.transfers, []
        return transfers

    def _fits(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `seq`'s blocks already have room for its new tokens; the blocks they fill are
        registered as cached."""
        blocks = self.seq_blocks.get(seq.seq_id)
        total = seq.num_computed_tokens + num_new_tokens
        if blocks is None or total > len(blocks) * self.block_size:
            return False
        if self.enable_prefix_caching:
            self._cache_full_blocks(seq, total)
        self._note_quiet(seq)
        return True

    def _note_quiet(self, seq: Sequence) -> None:
        """`seq.kv_quiet_below`: one past its blocks' room, and with prefix caching at most the
        end of the first block it has not cached."""
        limit = len(self.seq_blocks[seq.seq_id]) * self.block_size + 1
        if self.enable_prefix_caching:
            limit = min(limit, (self.num_hashed_blocks.get(seq.seq_id, 0) + 1) * self.block_size)
        seq.kv_quiet_below = limit

    def trim(self, seq: Sequence, num_tokens: int) -> bool:
        """Return the blocks of `seq` past its first `num_tokens` tokens (the room of rejected
        proposed tokens); whether there were any. Those blocks were never cached: a block is
        hashed only once every token of it is in the sequence."""
        blocks = self.seq_blocks[seq.seq_id]
        keep = blocks_for(num_tokens, self.block_size)
        if len(blocks) <= keep:
            return False
        self.pool.release(reversed(blocks[keep:]))
        del blocks[keep:]
        del self.block_tables[seq.seq_id][keep:]
        self._note_quiet(seq)
        return True

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq`; its last blocks become the first to be evicted."""
        blocks = self.seq_blocks.get(seq.seq_id)
        if blocks is not None:
            self._ask_retention(seq, blocks)
            self.pool.release(reversed(blocks))
        self._forget(seq)

    def _ask_retention(self, seq: Sequence, blocks: list[KVBlock]) -> None:
        """Renew what `seq` asks for its cached blocks: a duration counts from the last release."""
        num_hashed = self.num_hashed_blocks.get(seq.seq_id, 0)
        if seq.kv_retention is None or not num_hashed:
            return
        asks = seq.kv_retention.block_asks(0, num_hashed, self.block_size, seq.num_prompt_tokens, self.pool.clock())
        self.pool.ask(blocks[:num_hashed], asks)

    def can_fork(self, parent: Sequence) -> bool:
        partial = len(self.seq_blocks[parent.seq_id]) > parent.num_computed_tokens // self.block_size
        return not partial or self.pool.num_free > 0

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Let `child` share the full blocks of `parent`. A partly filled last block is given
        to the child as a fresh block instead; the returned (src, dst) block ids must then be
        copied before the next forward pass. Check `can_fork` first."""
        blocks = self.seq_blocks[parent.seq_id]
        num_full = parent.num_computed_tokens // self.block_size
        shared = blocks[:num_full]
        self.pool.touch(shared)
        child_blocks = list(shared)
        copy = None
        if len(blocks) > num_full:
            (fresh,) = self.pool.take(1)
            child_blocks.append(fresh)
            copy = (blocks[num_full].block_id, fresh.block_id)
        self.seq_blocks[child.seq_id] = child_blocks
        self.block_tables[child.seq_id] = [b.block_id for b in child_blocks]
        self.grown.append(child.seq_id)
        self.num_hashed_blocks[child.seq_id] = min(num_full, self.num_hashed_blocks.get(parent.seq_id, 0))
        child.block_hashes = parent.block_hashes[:num_full]
        self._note_quiet(child)
        return copy

    def snapshot(self) -> BlockSnapshot:
        """The cached blocks as of the last batch handed out by `take_events`."""
        return BlockSnapshot(self.epoch, self._event_seq, self.cached_block_hashes())

    def reset_prefix_cache(self) -> bool:
        if not self.pool.reset_cache():
            return False
        if self.host:
            self.host.reset_cache()
            self.host.events = []  # the device's `cleared` covers both tiers
        return True

    def take_events(self) -> KVEventBatch | None:
        """The events since the last call, numbered; None when nothing happened."""
        events = self.pool.events + self.host.events if self.host else self.pool.events
        if not events:
            return None
        self._event_seq += 1
        batch = KVEventBatch(self.epoch, self._event_seq, time.time(), events)
        self.pool.events = []
        if self.host:
            self.host.events = []
        return batch

    def _forget(self, seq: Sequence) -> None:
        self.seq_blocks.pop(seq.seq_id, None)
        self.block_tables.pop(seq.seq_id, None)
        self.num_hashed_blocks.pop(seq.seq_id, None)
        seq.kv_quiet_below = 0

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        extend_block_chain(seq.block_hashes, seq.token_ids, self.block_size, seq.cache_salt, num_blocks,
                           seq.lora_name)

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that will be full once `num_tokens` tokens are computed. Their
        K/V is written by the coming forward pass, before any attention reads it. A block
        holding a pending token waits: its hash needs the token."""
        num_full = min(num_tokens, seq.num_tokens - seq.num_pending) // self.block_size
        start = self.num_hashed_blocks.get(seq.seq_id, 0)
        if num_full <= start:
            return
        self._extend_hashes(seq, num_full)
        parent: BlockHash | None = seq.block_hashes[start - 1] if start else None
        size = self.block_size
        retention = seq.kv_retention
        asks = (retention.block_asks(start, num_full - start, size, seq.num_prompt_tokens, self.pool.clock())
                if retention else [None] * (num_full - start))
        self.pool.cache(
            self.seq_blocks[seq.seq_id][start:num_full],
            seq.block_hashes[start:num_full],
            parent,
            seq.token_ids[start * size : num_full * size],
            asks,
            seq.lora_name,
        )
        self.num_hashed_blocks[seq.seq_id] = num_full
