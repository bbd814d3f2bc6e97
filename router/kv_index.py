"""Which replica holds which KV block, rebuilt from the replicas' own KV events."""

from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from itertools import chain, takewhile

from kvserve.workers.engine.kv_events import (
    DEVICE_MEDIUM, HOST_MEDIUM, AllBlocksCleared, BlockRemoved, KVEvent, apply_events,
)
from kvserve.workers.protocol import (
    DEFAULT_RETENTION_PRIORITY, HEARTBEAT_PERIOD_S, MISSED_HEARTBEATS, BlockHash, BlockSnapshot, Heartbeat,
    KVEventBatch,
)

SILENCE_S = MISSED_HEARTBEATS * HEARTBEAT_PERIOD_S
_SHARDS = 256  # of `HolderMap`, by a hash's first byte


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


def held_run(held: set[BlockHash], block_hashes: list[BlockHash], start: int) -> int:
    """How many blocks of `block_hashes` from `start` on are in `held`, in a row. Checked in
    slices that double, each in one call (`issuperset` stops at its first miss), and one by
    one only in the slice that misses: a long prompt's chain costs no Python step per block."""
    end, size = start, 32
    while end < len(block_hashes):
        piece = block_hashes[end : end + size]
        if not held.issuperset(piece):
            return end - start + len(list(takewhile(held.__contains__, piece)))
        end += len(piece)
        size *= 2
    return end - start


def follow_retention(retained: set[BlockHash], events: Iterable[KVEvent]) -> None:
    """Keep `retained`, a replica's device blocks stored at a retention priority above the
    default, in step with its events. Its pool evicts every block of the default priority or
    lower before one of those, so placement counts them as staying."""
    for event in events:
        if isinstance(event, AllBlocksCleared):
            retained.clear()
        elif event.medium != DEVICE_MEDIUM:
            continue
        elif isinstance(event, BlockRemoved) or event.priority <= DEFAULT_RETENTION_PRIORITY:
            retained.difference_update(event.block_hashes)
        else:
            retained.update(event.block_hashes)


Holding = str | frozenset[str]  # who holds a block: a replica's name, or two or more names
_UNSEEN = object()


def _joined(held: Holding, replica: str) -> Holding:
    """`held` with `replica` too."""
    if type(held) is str:
        return held if held == replica else frozenset((held, replica))
    return held if replica in held else held | {replica}


def _left(held: Holding, replica: str) -> Holding | None:
    """`held` without `replica` (None: nobody)."""
    if type(held) is str:
        return None if held == replica else held
    if replica not in held:
        return held
    rest = held - {replica}
    return next(iter(rest)) if len(rest) == 1 else rest


def _mark(marked: set[str], replica: str, blocks: set[BlockHash]) -> None:
    """`replica` in `marked` exactly while `blocks` holds something."""
    if blocks:
        marked.add(replica)
    else:
        marked.discard(replica)


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
    # Its host-memory tier's blocks (`kv_offload_gib`), from events only: a snapshot holds the
    # device's, so after a reload the tier counts as empty until its events come.
    host_blocks: set[BlockHash] = field(default_factory=set)
    # Its device blocks stored at a retention priority above the default (`follow_retention`),
    # from events only, as the host tier's: a snapshot carries no priorities.
    retained: set[BlockHash] = field(default_factory=set)


class HolderMap:
    """From each block hash to whoever holds it (a `Holding`), split by the hash's first byte
    into `_SHARDS` dicts; the index's walks and updates pick the shard themselves
    (`shards[block_hash[0]]`), the rest reads it as one mapping.

    A dict that keeps taking new keys and losing old ones rebuilds its whole table once in a
    while, in one go. For the millions of blocks a large cluster caches, one dict paused the
    router's event loop for up to a second at a rebuild; a shard rebuilds 1/256 of it (the
    numbers: docs/benchmarks.md, "Python's table rebuilds"). Block hashes are SHA-256, so
    their first bytes spread the blocks evenly."""

    def __init__(self):
        self.shards: list[dict[BlockHash, Holding]] = [{} for _ in range(_SHARDS)]

    def get(self, block_hash: BlockHash) -> Holding | None:
        return self.shards[block_hash[0]].get(block_hash)

    def __getitem__(self, block_hash: BlockHash) -> Holding:
        return self.shards[block_hash[0]][block_hash]

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self.shards[block_hash[0]]

    def __len__(self) -> int:
        return sum(map(len, self.shards))

    def __iter__(self) -> Iterator[BlockHash]:
        return chain.from_iterable(self.shards)

    def values(self) -> Iterator[Holding]:
        return chain.from_iterable(shard.values() for shard in self.shards)


class KVIndex:
    """Which replica holds which KV block. Exact: it only knows what events said.

    A replica's state starts from a snapshot of one epoch and follows only that epoch's
    batches, in order. The caller drops a replica whose state can no longer be trusted (a gap,
    a heartbeat that disagrees, a new epoch) and loads a snapshot again. A replica without
    state, or whose last heartbeat is older than SILENCE_S, is unknown (`KVIndexFollower.known_mask`):
    it matches nothing.

    Two views of the same facts, kept in step by every snapshot, applied batch and drop:
    `replicas[r].blocks`, each replica's own block set (its count is what heartbeats check;
    read it, never change it from outside), and `holders`, from each block hash to whoever
    holds it, which lets `prefix_matches` walk a prompt's chain once for the whole cluster.
    A hash's holder is stored as the replica's name while it has one holder (most blocks: a
    set per block would cost ~200 bytes each and millions of objects for the garbage
    collector to scan), as a frozenset of two or more names otherwise; a hash nobody holds
    has no entry. The blocks of one event batch that change from the same holders to the
    same holders share one frozenset, so a prefix several replicas hold is mostly runs of
    one object, which `prefix_matches` passes through by identity.
    """

    def __init__(self):
        self.replicas: dict[str, ReplicaBlocks] = {}
        self.holders = HolderMap()
        self.with_host_blocks: set[str] = set()  # the replicas whose host tier holds something
        self.with_retained_blocks: set[str] = set()  # the replicas with blocks above the default priority

    def drop_replica(self, replica: str) -> None:
        state = self.replicas.pop(replica, None)
        self.with_host_blocks.discard(replica)
        self.with_retained_blocks.discard(replica)
        if state is not None:
            self._release(replica, state.blocks)

    def load_snapshot(self, replica: str, block_size: int, snapshot: BlockSnapshot, heartbeat: Heartbeat,
                      now: float) -> None:
        blocks = set(snapshot.blocks)
        old = self.replicas.get(replica)
        if old is None:
            self._take(replica, blocks)
        else:  # a reload mostly finds the same blocks: move only the difference
            self._release(replica, old.blocks - blocks)
            self._take(replica, blocks - old.blocks)
        self.replicas[replica] = ReplicaBlocks(block_size, snapshot.epoch, snapshot.seq, blocks, heartbeat, now)
        self.with_host_blocks.discard(replica)
        self.with_retained_blocks.discard(replica)

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
        self._apply_events(replica, state.blocks, batch.events)
        apply_events(state.host_blocks, batch.events, HOST_MEDIUM)
        _mark(self.with_host_blocks, replica, state.host_blocks)
        follow_retention(state.retained, batch.events)
        _mark(self.with_retained_blocks, replica, state.retained)
        state.last_seq = batch.seq
        return Fate.APPLIED

    def _apply_events(self, replica: str, blocks: set[BlockHash], events: list[KVEvent]) -> None:
        """`apply_events` (the one definition of what the events mean) on the replica's set,
        and the net change carried over to `holders`. Only the hashes the events name can
        change, or everything held for AllBlocksCleared: O(events), or O(blocks) for a clear."""
        touched: set[BlockHash] = set()
        for event in events:
            if isinstance(event, AllBlocksCleared):
                touched |= blocks
            else:
                touched.update(event.block_hashes)
        before = touched & blocks
        apply_events(blocks, events)
        after = touched & blocks
        self._release(replica, before - after)
        self._take(replica, after - before)

    def _take(self, replica: str, block_hashes: Iterable[BlockHash]) -> None:
        """`replica` now holds these blocks (it did not before)."""
        shards = self.holders.shards
        joined: dict[Holding, Holding] = {}  # each holding met here, with `replica`: a chain's blocks share one
        for block_hash in block_hashes:
            holders = shards[block_hash[0]]
            held = holders.get(block_hash)
            if held is None:
                holders[block_hash] = replica
                continue
            new = joined.get(held)
            if new is None:
                new = joined[held] = _joined(held, replica)
            holders[block_hash] = new

    def _release(self, replica: str, block_hashes: Iterable[BlockHash]) -> None:
        """`replica` no longer holds these blocks."""
        shards = self.holders.shards
        left: dict[Holding, Holding | None] = {}  # each holding met here, without `replica`
        for block_hash in block_hashes:
            holders = shards[block_hash[0]]
            held = holders.get(block_hash)
            if held is None:
                continue
            new = left.get(held, _UNSEEN)
            if new is _UNSEEN:
                new = left[held] = _left(held, replica)
            if new is None:
                del holders[block_hash]
            else:
                holders[block_hash] = new

    def holders_of(self, block_hash: BlockHash) -> set[str]:
        """The replicas holding this block (a new set)."""
        held = self.holders.get(block_hash)
        if held is None:
            return set()
        return {held} if type(held) is str else set(held)

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

    def host_extensions(self, block_hashes: list[BlockHash], replicas: Container[str],
                        device_depths: dict[str, int]) -> dict[str, int]:
        """For those of `replicas` that have a host tier, how many leading blocks of
        `block_hashes` they hold in either tier: their device depth (from `device_depths`,
        0 where absent), then on through blocks on the host (or on the device again).
        Replicas without host blocks are left out."""
        extended = {}
        for replica in [r for r in self.with_host_blocks if r in replicas]:  # few: no walk over all replicas
            state, depth = self.replicas[replica], device_depths.get(replica, 0)
            host, device = state.host_blocks, state.blocks
            rest = block_hashes[depth:]
            extended[replica] = depth + len(list(takewhile(lambda h: h in host or h in device, rest)))
        return extended

    def prefix_matches(self, block_hashes: list[BlockHash], replicas: Container[str]) -> dict[str, int]:
        """For each of `replicas` that holds the first of `block_hashes`, how many leading
        blocks it holds (as `leading_matches` over each replica's set); the others, most of
        them, hold none and are left out.

        One walk down the chain for all replicas: those still matching after block d are
        those still matching before it that hold it (from `holders`). Each of the others keeps
        the depth at which it dropped out. Once one replica is left, the walk goes on in its
        own set (one set lookup a block, no holder map), until its first miss. A block held
        by the very holding of the block before it changes nothing (`_take` and `_release`
        make a run of them). The cost follows the prompt and the blocks' holders, not the
        number of replicas asked."""
        matched = {}
        shards = self.holders.shards
        alive = None  # the replicas asked that hold every block so far (None before the first)
        last_held = None
        depth = 0
        blocks_left = iter(block_hashes)
        for block_hash in blocks_left:
            held = shards[block_hash[0]].get(block_hash)
            if held is None:
                break
            if held is last_held:
                depth += 1
                continue
            last_held = held
            if alive is None:  # the first block
                still = {r for r in ((held,) if type(held) is str else held) if r in replicas}
            elif type(held) is str:
                still = {held} if held in alive else set()
            else:
                still = alive if alive <= held else alive & held
            if not still:
                break
            if alive is not None and len(still) < len(alive):
                matched.update(dict.fromkeys(alive - still, depth))
            alive = still
            depth += 1
            if len(alive) == 1:
                (last,) = alive
                depth += held_run(self.replicas[last].blocks, block_hashes, depth)
                break
        if depth:
            matched.update(dict.fromkeys(alive, depth))
        return matched
