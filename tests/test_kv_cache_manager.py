"""The block manager under random allocate/append/fork/free sequences, with retention
priorities and a host tier, checked against a shadow memory that records which token each
cache slot (device and host) holds."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvserve.workers.engine.block_hash import hash_block_chain
from kvserve.workers.engine.kv_cache_manager import KVCacheManager, blocks_for
from kvserve.workers.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from kvserve.workers.engine.retention import KVRetention, RetentionRange
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.sequence import Sequence

BLOCK = 4
PARAMS = SamplingParams()


def make_seq(name: str, tokens: list[int], salt: str | None = None, retention: KVRetention | None = None) -> Sequence:
    return Sequence(name, 0, tokens, PARAMS, arrival=0.0, cache_salt=salt, kv_retention=retention)


RETENTIONS = st.sampled_from([
    None, None, KVRetention((RetentionRange(0, 4, 100),)), KVRetention((RetentionRange(2, None, 0, 5.0),), 80),
])


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(4, 24), caching=st.booleans(), host_blocks=st.sampled_from([0, 0, 2, 8]))
    def setup(self, num_blocks, caching, host_blocks):
        self.kv = KVCacheManager(num_blocks, BLOCK, caching, host_blocks)
        self.slots: dict[int, int] = {}  # slot -> token written there
        self.host_slots: dict[int, int] = {}
        self.live: dict[str, Sequence] = {}
        self.cached_index: set[bytes] = set()  # rebuilt from the event stream only
        self.host_index: set[bytes] = set()
        self.next_id = 0

    def _transfer(self) -> None:
        for t in self.kv.take_transfers():
            src, dst = (self.slots, self.host_slots) if t.to_host else (self.host_slots, self.slots)
            for off in range(BLOCK):
                if t.src * BLOCK + off in src:
                    dst[t.dst * BLOCK + off] = src[t.src * BLOCK + off]

    def _write(self, seq: Sequence, start: int, end: int) -> None:
        self._transfer()
        table = self.kv.block_tables[seq.seq_id]
        for pos in range(start, end):
            self.slots[table[pos // BLOCK] * BLOCK + pos % BLOCK] = seq.token_ids[pos]
        seq.num_computed_tokens = end

    @rule(
        tokens=st.lists(st.integers(0, 3), min_size=1, max_size=14),
        salt=st.sampled_from([None, None, "tenant"]),
        retention=RETENTIONS,
    )
    def admit(self, tokens, salt, retention):
        seq = make_seq(f"s{self.next_id}", tokens, salt, retention)
        self.next_id += 1
        hits = self.kv.get_computed_blocks(seq)
        num_cached = len(hits) * BLOCK
        assert num_cached < len(tokens)
        if self.kv.allocate_slots(seq, len(tokens) - num_cached, hits):
            seq.num_computed_tokens = num_cached
            self._write(seq, num_cached, len(tokens))
            self.live[seq.seq_id] = seq
        else:
            assert seq.seq_id not in self.kv.seq_blocks

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, data, new):
        seq = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        seq.token_ids.extend(new)
        start = seq.num_computed_tokens
        if self.kv.allocate_slots(seq, len(new)):
            self._write(seq, start, seq.num_tokens)
        else:
            del seq.token_ids[start:]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if not self.kv.can_fork(parent):
            assert parent.num_tokens % BLOCK and self.kv.num_free_blocks == 0
            return
        child = Sequence(parent.request_id, self.next_id, parent.token_ids, PARAMS, 0.0, cache_salt=parent.cache_salt)
        self.next_id += 1
        copy = self.kv.fork(parent, child)
        self._transfer()
        if copy is not None:
            src, dst = copy
            for off in range(BLOCK):
                if src * BLOCK + off in self.slots:
                    self.slots[dst * BLOCK + off] = self.slots[src * BLOCK + off]
        child.num_computed_tokens = parent.num_computed_tokens
        self.live[child.seq_id] = child

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.kv.free(seq)
        assert seq.seq_id not in self.kv.seq_blocks

    @rule()
    def reset_prefix_cache(self):
        assert self.kv.reset_prefix_cache() == (not self.live)

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        for seq in self.live.values():
            table = self.kv.block_tables[seq.seq_id]
            assert len(table) == blocks_for(seq.num_computed_tokens, BLOCK)
            read = [self.slots[table[p // BLOCK] * BLOCK + p % BLOCK] for p in range(seq.num_computed_tokens)]
            assert read == seq.token_ids[: seq.num_computed_tokens]

    @invariant()
    def reference_counts_and_free_queue_agree(self):
        refs: dict[int, int] = {}
        for seq in self.live.values():
            for block_id in self.kv.block_tables[seq.seq_id]:
                refs[block_id] = refs.get(block_id, 0) + 1
        for block in self.kv.pool.blocks:
            assert block.ref_count == refs.get(block.block_id, 0)
            assert (block in self.kv.pool.free_queue) == (block.ref_count == 0)
        assert len(self.kv.pool.free_queue) == sum(b.ref_count == 0 for b in self.kv.pool.blocks)
        assert set(self.kv.seq_blocks) == set(self.live)

    @invariant()
    def cached_blocks_hold_what_their_hash_names(self):
        pool = self.kv.pool
        for block_hash, block in pool.cached.items():
            assert block.block_hash == block_hash
        assert sum(b.block_hash is not None for b in pool.blocks) == len(pool.cached)
        for seq in self.live.values():
            num_full = seq.num_computed_tokens // BLOCK
            chain = hash_block_chain(seq.token_ids[: num_full * BLOCK], BLOCK, seq.cache_salt)
            for block, expected in zip(self.kv.seq_blocks[seq.seq_id], chain):
                assert block.block_hash in (None, expected)

    @invariant()
    def events_replay_to_the_cache(self):
        batch = self.kv.take_events()
        for event in batch.events if batch else []:
            if isinstance(event, AllBlocksCleared):
                self.cached_index.clear()
                self.host_index.clear()
                continue
            index = self.host_index if event.medium == "cpu" else self.cached_index
            if isinstance(event, BlockStored):
                assert len(event.token_ids) == len(event.block_hashes) * BLOCK
                index.update(event.block_hashes)
            else:
                index.difference_update(event.block_hashes)
        assert self.cached_index == set(self.kv.pool.cached)
        assert self.host_index == set(self.kv.host.cached if self.kv.host else ())

    @invariant()
    def host_blocks_hold_what_their_hash_names(self):
        if not self.kv.host:
            return
        self._transfer()
        for block_hash, block in self.kv.host.cached.items():
            tokens = [self.host_slots.get(block.block_id * BLOCK + off) for off in range(BLOCK)]
            assert tokens == list(block.token_ids)
            assert block.ref_count == 0

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for seq in list(self.live.values()):
            self.kv.free(seq)
        assert self.kv.num_free_blocks == self.kv.num_blocks


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prefix_hit_reuses_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(16, BLOCK)
    first = make_seq("a", list(range(12)))
    assert kv.allocate_slots(first, 12)
    first.num_computed_tokens = 12
    kv.free(first)
    again = make_seq("b", list(range(12)))
    hits = kv.get_computed_blocks(again)
    assert len(hits) == 2  # the third block is recomputed so that logits exist
    longer = make_seq("c", list(range(13)))
    assert len(kv.get_computed_blocks(longer)) == 3


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(16, BLOCK)
    seq = make_seq("a", list(range(9)), salt="alice")
    assert kv.allocate_slots(seq, 9)
    assert kv.get_computed_blocks(make_seq("b", list(range(9)), salt="bob")) == []
    assert len(kv.get_computed_blocks(make_seq("c", list(range(9)), salt="alice"))) == 2


def test_eviction_is_least_recently_freed_and_emits_removed():
    kv = KVCacheManager(4, BLOCK)
    a, b = make_seq("a", [1] * 8), make_seq("b", [2] * 8)
    for seq in (a, b):
        assert kv.allocate_slots(seq, 8)
        seq.num_computed_tokens = 8
    kv.free(a)
    kv.free(b)
    kv.take_events()
    c = make_seq("c", [3] * 8)
    assert kv.allocate_slots(c, 8)
    removed = [h for e in kv.take_events().events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed == hash_block_chain([1] * 8, BLOCK)[::-1]
    assert len(kv.get_computed_blocks(make_seq("d", [2] * 9))) == 2


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(2, BLOCK)
    seq = make_seq("a", list(range(12)))
    assert not kv.allocate_slots(seq, 12)
    assert kv.num_free_blocks == 2 and not kv.seq_blocks
