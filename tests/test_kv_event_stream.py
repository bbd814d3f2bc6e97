"""The KV event stream under faults: the real `KVEventHub` and `KVIndexFollower`, driven in
process (the hub's methods are what its actor runs), fed by real `KVCacheManager`s.

Each replica double publishes as `LLMServer` does: once a heartbeat period, its new batch and
a heartbeat; after a refusal, a fresh registration with a snapshot. Faults are injected on the
replica -> hub link and on the hub -> follower answers. After each fault, within two heartbeat
periods (one to hear of the refusal, one to register again), the hub's and the router's block
set of every replica equal the replica's own cache, and no stale epoch's event was applied.
"""

import asyncio
import dataclasses
import random
import time
from types import SimpleNamespace

from prometheus_client import REGISTRY

from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.kv_index import SILENCE_S
from kvserve.router.kv_scoring import KVScorer
from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.engine.kv_cache_manager import KVCacheManager
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.sequence import Sequence
from kvserve.workers.kv_event_hub import FOLLOWER_SILENCE_S, LOG_BATCHES, KVEventHub, hub_of
from kvserve.workers.protocol import (
    HEARTBEAT_PERIOD_S, BlockStored, EngineStats, Heartbeat, HubNews, KVCursor, KVEventBatch, ReplicaNews,
    ReplicaRegistration,
)

BLOCK = 4
ALIVE = SimpleNamespace(__ray_ready__=SimpleNamespace(remote=lambda: asyncio.sleep(0)))  # answers the hub's pings


class Replica:
    """One engine's KV cache and the publishing side of `LLMServer`."""

    def __init__(self, name: str, seed: int, alphabet: range = range(6)):
        self.name = name
        self.rng = random.Random(seed)
        self.alphabet = alphabet
        self.restart()

    def restart(self) -> None:
        """A new engine under the same name: an empty cache of a new epoch."""
        self.kv = KVCacheManager(16, BLOCK)
        self.seq = 0
        self.resync = True
        self.requests = 0
        self.registrations = 0

    def work(self, prompts: int = 3) -> None:
        """Run a few short prompts over a small alphabet: shared prefixes, evictions, resets."""
        for _ in range(prompts):
            tokens = [self.rng.choice(self.alphabet) for _ in range(self.rng.randrange(5, 21))]
            seq = Sequence(f"{self.name}-{self.requests}", 0, tokens, SamplingParams(), 0.0)
            self.requests += 1
            hits = self.kv.get_computed_blocks(seq)
            assert self.kv.allocate_slots(seq, len(tokens) - len(hits) * BLOCK, hits)
            seq.num_computed_tokens = len(tokens)
            self.kv.free(seq)
        if self.rng.random() < 0.05:
            assert self.kv.reset_prefix_cache()

    def take(self) -> KVEventBatch | None:
        batch = self.kv.take_events()
        if batch is not None:
            self.seq = batch.seq
        return batch

    def heartbeat(self) -> Heartbeat:
        kv = self.kv
        stats = EngineStats(running=0, waiting=0, kv_blocks_total=kv.num_blocks, kv_blocks_used=0,
                            kv_blocks_cached=kv.num_cached_blocks, num_preemptions=0, grammars=None, speculative=None,
                            host_tier=None, waiting_by_priority=(), lora_adapters=(),
                            queued_tokens=0, step_cost=None, working_set_blocks=0)
        return Heartbeat(kv.epoch, self.seq, time.time(), stats)

    def registration(self) -> ReplicaRegistration:
        snapshot = self.kv.snapshot()
        self.seq = snapshot.seq
        self.registrations += 1
        return ReplicaRegistration(self.name, BLOCK, hash_check_value(BLOCK), ALIVE, snapshot, self.heartbeat())


class Link:
    """Carries a replica's publishes to the hub, losing, repeating or holding back (delivering
    after later ones) a share of them."""

    def __init__(self, seed: int = 0, drop: float = 0.0, repeat: float = 0.0, hold: float = 0.0,
                 repeat_late: float = 0.0):
        self.rng = random.Random(seed)
        self.drop, self.repeat, self.hold, self.repeat_late = drop, repeat, hold, repeat_late
        self.held: list[tuple] = []

    def send(self, hub: KVEventHub, message: tuple) -> bool:
        """Deliver; False if the hub refused anything delivered (the replica hears of that)."""
        fate = self.rng.random()
        delivered = []
        if fate < self.drop:
            pass
        elif fate < self.drop + self.repeat:
            delivered = [message, message]
        elif fate < self.drop + self.repeat + self.hold:
            self.held.append(message)
        else:
            delivered = [message]
            if self.rng.random() < self.repeat_late:
                self.held.append(message)
        if self.held and self.rng.random() < 0.3:
            delivered, self.held = delivered + self.held, []
        return all([hub.publish(*m) for m in delivered])


async def beat(hub: KVEventHub, replica: Replica, link: Link = Link()) -> None:
    """One heartbeat period of a replica, as `LLMServer._publish` spends it."""
    batch = replica.take()
    if replica.resync:
        replica.resync = False
        await hub.register(replica.registration())
        return
    message = (replica.name, [batch] if batch else [], replica.heartbeat())
    if not link.send(hub, message):
        replica.resync = True


async def follow(follower: KVIndexFollower, hub: KVEventHub, mangle=lambda news: news) -> None:
    follower.apply(mangle(await hub.follow(follower.follower_id, follower.cursors(), -1, 0)))


def assert_right_where_caught_up(hub: KVEventHub, follower: KVIndexFollower, replicas: list[Replica]) -> None:
    """Wherever the hub's or the router's copy claims the replica's current position, it is exact."""
    for replica in replicas:
        cached = set(replica.kv.cached_block_hashes())
        hub_state = hub.replicas.get(replica.name)
        if hub_state is not None and (hub_state.epoch, hub_state.seq) == (replica.kv.epoch, replica.seq):
            assert hub_state.blocks == cached
        state = follower.index.replicas.get(replica.name)
        if state is not None and (state.epoch, state.last_seq) == (replica.kv.epoch, replica.seq):
            assert state.blocks == cached


async def settle(hub: KVEventHub, follower: KVIndexFollower, replicas: list[Replica]) -> None:
    """Two quiet heartbeat periods, the follower answered after each."""
    for _ in range(2):
        for replica in replicas:
            await beat(hub, replica)
        await follow(follower, hub)


def assert_exact(hub: KVEventHub, follower: KVIndexFollower, replicas: list[Replica]) -> None:
    for replica in replicas:
        cached = set(replica.kv.cached_block_hashes())
        assert hub.replicas[replica.name].blocks == cached, replica.name
        assert follower.index.replicas[replica.name].blocks == cached, replica.name
        assert follower.known([replica.name]) == [replica.name]


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def started(replicas: list[Replica]) -> tuple[KVEventHub, KVIndexFollower]:
    hub = KVEventHub()
    follower = KVIndexFollower("stream-test", BLOCK)
    for replica in replicas:
        await beat(hub, replica)
    await follow(follower, hub)
    return hub, follower


def test_lost_repeated_and_late_batches_to_the_hub():
    async def run():
        replicas = [Replica("a", 1), Replica("b", 2)]
        hub, follower = await started(replicas)
        link = Link(seed=3, drop=0.1, repeat=0.1, hold=0.1)
        for period in range(300):
            for replica in replicas:
                replica.work()
                await beat(hub, replica, link)
            await follow(follower, hub)
            assert_right_where_caught_up(hub, follower, replicas)
        await settle(hub, follower, replicas)
        assert_exact(hub, follower, replicas)

    asyncio.run(run())


def mangler(seed: int):
    """Loses, repeats or swaps batches in the hub's answers to the follower."""
    rng = random.Random(seed)

    def mangle(news: HubNews) -> HubNews:
        replicas = {}
        for name, replica_news in news.replicas.items():
            batches = list(replica_news.batches or [])
            if batches and rng.random() < 0.3:
                k = rng.randrange(len(batches))
                batches = rng.choice([batches[:k] + batches[k + 1:], batches[:k + 1] + batches[k:],
                                      batches[:k] + batches[k:][::-1]])
            replicas[name] = dataclasses.replace(replica_news, batches=batches) if replica_news.batches else replica_news
        return HubNews(news.version, replicas, news.followers, news.relayed)

    return mangle


def test_lost_repeated_and_swapped_batches_to_the_follower():
    async def run():
        replicas = [Replica("a", 4), Replica("b", 5)]
        hub, follower = await started(replicas)
        mangle = mangler(6)
        snapshots = counter("kvserve_router_kv_snapshots_total")
        for period in range(300):
            for replica in replicas:
                replica.work()
                await beat(hub, replica)
            if period % 3 == 0:  # the follower sometimes gets several batches in one answer
                await follow(follower, hub, mangle)
                assert_right_where_caught_up(hub, follower, replicas)
        await settle(hub, follower, replicas)
        assert_exact(hub, follower, replicas)
        assert counter("kvserve_router_kv_snapshots_total") > snapshots + 2

    asyncio.run(run())


def test_repeated_batches_cost_no_resync_and_no_snapshot():
    async def run():
        replicas = [Replica("a", 14), Replica("b", 15)]
        hub, follower = await started(replicas)
        link = Link(seed=16, repeat=0.2, repeat_late=0.2)
        snapshots = counter("kvserve_router_kv_snapshots_total")

        def repeat_late(news: HubNews) -> HubNews:
            return HubNews(news.version, {name: dataclasses.replace(n, batches=n.batches + n.batches[:1])
                                          if n.batches else n for name, n in news.replicas.items()}, news.followers,
                           news.relayed)

        for period in range(200):
            for replica in replicas:
                replica.work()
                await beat(hub, replica, link)
            if period % 3 == 0:
                await follow(follower, hub, repeat_late)
        await settle(hub, follower, replicas)
        assert_exact(hub, follower, replicas)
        assert [r.registrations for r in replicas] == [1, 1]
        assert counter("kvserve_router_kv_snapshots_total") == snapshots

    asyncio.run(run())


def stored_hashes(batch: KVEventBatch) -> set:
    return {h for event in batch.events if isinstance(event, BlockStored) for h in event.block_hashes}


def test_a_restarted_replica_s_old_epoch_is_fenced_off_at_the_hub_and_the_router():
    async def run():
        replica = Replica("a", 7, alphabet=range(100, 106))
        hub, follower = await started([replica])
        replica.work()
        late = (replica.name, [replica.take()], replica.heartbeat())  # batch 1, in flight at the restart
        old_hashes = stored_hashes(late[1][0])
        replica.restart()  # same name, new epoch, an empty cache
        await beat(hub, replica)  # registers the new epoch at batch 0: the late batch 1 would follow on
        fenced = hub.fenced_batches
        assert hub.publish(*late) is False and hub.fenced_batches == fenced + 1
        assert hub.replicas["a"].blocks == set()
        await follow(follower, hub)  # a snapshot of the new epoch
        assert_exact(hub, follower, [replica])
        router_fenced = counter("kvserve_router_kv_fenced_batches_total")
        current = hub.replicas["a"].heartbeat
        stale = HubNews(hub.version, {"a": ReplicaNews(BLOCK, hash_check_value(BLOCK), current, late[1], None)}, 1,
                        frozenset({"a"}))
        follower.apply(stale)  # the old epoch's batch 1, right after the new epoch's batch 0
        assert counter("kvserve_router_kv_fenced_batches_total") == router_fenced + 1
        assert not follower.index.replicas["a"].blocks & old_hashes
        replica.alphabet = range(6)
        replica.work()
        await settle(hub, follower, [replica])
        assert_exact(hub, follower, [replica])

    asyncio.run(run())


def test_a_batch_that_lost_events_is_caught_by_the_heartbeat_s_block_count():
    async def run():
        replica = Replica("a", 8)
        hub, follower = await started([replica])
        replica.work()
        batch = replica.take()
        assert stored_hashes(batch)
        gutted = dataclasses.replace(batch, events=[])  # its seq follows on; its blocks are missing
        assert hub.publish(replica.name, [gutted], replica.heartbeat()) is False
        replica.resync = True
        await settle(hub, follower, [replica])
        assert_exact(hub, follower, [replica])

        def gut(news: HubNews) -> HubNews:
            return HubNews(news.version, {name: dataclasses.replace(n, batches=[dataclasses.replace(b, events=[])
                                                                               for b in n.batches])
                                          if n.batches else n for name, n in news.replicas.items()}, news.followers,
                           news.relayed)

        replica.work()
        await beat(hub, replica)
        await follow(follower, hub, gut)  # the follower's copy misses blocks the heartbeat counts
        assert follower.known(["a"]) == []
        await settle(hub, follower, [replica])
        assert_exact(hub, follower, [replica])

    asyncio.run(run())


def test_a_restarted_hub_is_joined_again_from_a_snapshot():
    async def run():
        replicas = [Replica("a", 9), Replica("b", 10)]
        hub, follower = await started(replicas)
        for _ in range(5):
            for replica in replicas:
                replica.work()
                await beat(hub, replica)
            await follow(follower, hub)
        hub = KVEventHub()  # the old one died with its state
        for replica in replicas:
            replica.work()
            await beat(hub, replica)  # refused: unknown to the new hub
        await settle(hub, follower, replicas)
        assert_exact(hub, follower, replicas)

    asyncio.run(run())


def test_a_follower_behind_the_log_gets_a_snapshot():
    async def run():
        replica = Replica("a", 11)
        hub, follower = await started([replica])
        for _ in range(LOG_BATCHES + 10):
            replica.work()
            await beat(hub, replica)
        snapshots = counter("kvserve_router_kv_snapshots_total")
        await follow(follower, hub)
        assert counter("kvserve_router_kv_snapshots_total") == snapshots + 1
        assert_exact(hub, follower, [replica])

    asyncio.run(run())


def test_the_hub_answers_each_cursor_with_the_batches_after_it_or_a_snapshot():
    """Against the log read whole: a cursor within the log gets exactly the batches after it,
    one before the log's start or of another epoch a snapshot, one that has everything
    (the last heartbeat too) nothing."""
    async def run():
        replica = Replica("a", 17)
        hub = KVEventHub()
        await beat(hub, replica)  # registers
        for _ in range(LOG_BATCHES + 20):
            replica.work()
            await beat(hub, replica)
        state = hub.replicas["a"]
        logged = list(state.log)
        assert len(logged) == LOG_BATCHES and logged[-1].seq == state.seq
        for seq in range(logged[0].seq - 3, state.seq + 1):
            news = state.news_since(KVCursor(state.epoch, seq, None))
            if seq < logged[0].seq - 1:
                assert news.batches is None and news.snapshot.blocks and set(news.snapshot.blocks) == state.blocks
            else:
                assert news.snapshot is None and news.batches == [b for b in logged if b.seq > seq]
        assert state.news_since(KVCursor(state.epoch + 1, state.seq, None)).snapshot is not None
        assert state.news_since(KVCursor(state.epoch, state.seq, state.heartbeat.sent_at)) is None

    asyncio.run(run())


def test_a_follower_follows_every_hub_each_for_its_own_replicas():
    """With several hubs each replica publishes to the one `hub_of` names; the follower folds
    each hub's answers in with that hub's cursors, and a replica leaves the index when its
    own hub stops naming it, whatever the other hubs' answers say."""
    async def run():
        replicas = [Replica(f"r{k}", 30 + k) for k in range(6)]
        hubs = [KVEventHub(), KVEventHub()]
        follower = KVIndexFollower("hubs-test", BLOCK, hubs=2)
        home = {r.name: hub_of(r.name, 2) for r in replicas}
        assert set(home.values()) == {0, 1}

        async def period():
            for replica in replicas:
                replica.work()
                await beat(hubs[home[replica.name]], replica)
            for k, hub in enumerate(hubs):
                assert set(follower.cursors(k)) <= {r for r, h in home.items() if h == k}
                follower.apply(await hub.follow(follower.follower_id, follower.cursors(k), -1, 0), k)

        for _ in range(6):
            await period()
        for k, hub in enumerate(hubs):
            assert_exact(hub, follower, [r for r in replicas if home[r.name] == k])
            quiet = await hub.follow(follower.follower_id, follower.cursors(k), -1, 0)  # nothing new since
            assert quiet.replicas == {} and quiet.relayed == {r for r, h in home.items() if h == k}
            follower.apply(quiet, k)
            assert_exact(hub, follower, [r for r in replicas if home[r.name] == k])
        leaving = replicas.pop()
        hubs[home[leaving.name]].unregister(leaving.name)
        other = 1 - home[leaving.name]
        follower.apply(await hubs[other].follow(follower.follower_id, follower.cursors(other), -1, 0), other)
        assert leaving.name in follower.index.replicas
        await period()
        assert leaving.name not in follower.index.replicas
        assert set(follower.index.replicas) == {r.name for r in replicas}

    asyncio.run(run())


def test_a_silent_replica_is_scored_as_caching_nothing_until_it_beats_again():
    async def run():
        now = [0.0]
        holder, other = Replica("holder", 12), Replica("other", 13, alphabet=range(50, 56))
        hub = KVEventHub()
        follower = KVIndexFollower("silence-test", BLOCK, clock=lambda: now[0])
        prompt = list(range(3 * BLOCK + 1))
        for replica in (holder, other):
            await beat(hub, replica)
        seq = Sequence("p", 0, prompt, SamplingParams(), 0.0)
        assert holder.kv.allocate_slots(seq, len(prompt))
        await beat(hub, holder)
        await follow(follower, hub)
        scorer = KVScorer(follower, BLOCK)
        hashes = hash_block_chain(prompt, BLOCK)
        assert scorer.rank(["holder", "other"], hashes, len(prompt)) == ([0, 1], "cached_prefix")
        now[0] += SILENCE_S + HEARTBEAT_PERIOD_S  # the holder falls silent; the other beats on
        await beat(hub, other)
        await follow(follower, hub)
        unknown = counter("kvserve_routing_decisions_with_unknown_replicas_total")
        assert scorer.rank(["holder", "other"], hashes, len(prompt))[1] == "no_cached_prefix"
        assert counter("kvserve_routing_decisions_with_unknown_replicas_total") == unknown + 1
        await beat(hub, holder)
        await follow(follower, hub)
        assert scorer.rank(["holder", "other"], hashes, len(prompt)) == ([0, 1], "cached_prefix")

    asyncio.run(run())


def test_the_hub_tells_each_follower_how_many_routers_follow_it():
    """Each ingress replica's router follows the hub; they read the same reports, and a router
    that knows it is one of several spreads its near ties (`cost_jitter`). A follower that
    stops polling stops counting."""
    async def run():
        now = [0.0]
        hub = KVEventHub(clock=lambda: now[0])
        replicas = [Replica("a", 1)]
        for replica in replicas:
            await beat(hub, replica)
        first, second = KVIndexFollower("count-test", BLOCK), KVIndexFollower("count-test", BLOCK)
        await follow(first, hub)
        assert first.routers == 1
        await follow(second, hub)
        await follow(first, hub)
        assert first.routers == second.routers == 2
        assert (await hub.follow(None, {}, -1, 0)).followers == 2  # a reader that routes nothing
        now[0] = FOLLOWER_SILENCE_S + 1  # the second one is gone
        await follow(first, hub)
        assert first.routers == 1

    asyncio.run(run())
