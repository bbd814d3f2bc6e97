"""The router's KV index, fed the engine's own event batches."""

import dataclasses
import gc
import math
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.kv_index import Fate, KVIndex, held_run, leading_matches
from kvserve.router.options import RouterOptions
from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.engine.kv_cache_manager import KVCacheManager
from kvserve.workers.engine.kv_events import DEVICE_MEDIUM, AllBlocksCleared, BlockRemoved, BlockStored, apply_events
from kvserve.workers.engine.retention import DEFAULT_RETENTION_PRIORITY
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.sequence import Sequence
from kvserve.workers.protocol import (
    BlockHash, BlockSnapshot, EngineStats, Heartbeat, HubNews, KVEventBatch, ReplicaNews, StepCost,
)

BLOCK = 4
EXACT_SECONDS = RouterOptions(cost_unit="seconds", cost_jitter=0)  # the predicted times, ranked as they are


def run_prompt(kv: KVCacheManager, name: str, tokens: list[int]) -> Sequence:
    seq = Sequence(name, 0, tokens, SamplingParams(), 0.0)
    hits = kv.get_computed_blocks(seq)
    assert kv.allocate_slots(seq, len(tokens) - len(hits) * BLOCK, hits)
    seq.num_computed_tokens = len(tokens)
    return seq


def start_following(index: KVIndex, replica: str, kv: KVCacheManager) -> None:
    snapshot = kv.snapshot()
    heartbeat = Heartbeat(snapshot.epoch, snapshot.seq, 0.0, pool_stats(cached=len(snapshot.blocks)))
    index.load_snapshot(replica, BLOCK, snapshot, heartbeat, now=0.0)


def test_index_follows_two_engines_exactly():
    engines = {"a": KVCacheManager(8, BLOCK), "b": KVCacheManager(8, BLOCK)}
    index = KVIndex()
    for name, kv in engines.items():
        start_following(index, name, kv)
    shared = list(range(12))
    run_prompt(engines["a"], "x", shared + [50])
    run_prompt(engines["b"], "y", shared[:4] + [99] * 9)
    for name, kv in engines.items():
        assert index.apply(name, kv.take_events()) is Fate.APPLIED
    query = hash_block_chain(shared + [1, 2, 3, 4], BLOCK)
    assert index.prefix_matches(query, ["a", "b"]) == {"a": 3, "b": 1}
    for name, kv in engines.items():
        assert index.replicas[name].blocks == set(kv.cached_block_hashes())


def test_eviction_and_replica_loss_leave_no_trace():
    kv = KVCacheManager(3, BLOCK)
    index = KVIndex()
    start_following(index, "a", kv)
    seq = run_prompt(kv, "x", list(range(9)))
    kv.free(seq)
    run_prompt(kv, "y", [7] * 9)  # needs all three blocks: evicts the first prompt's
    assert index.apply("a", kv.take_events()) is Fate.APPLIED
    assert index.replicas["a"].blocks == set(kv.cached_block_hashes())
    assert index.prefix_matches(hash_block_chain(list(range(9)), BLOCK), ["a"]) == {}
    index.drop_replica("a")
    assert not index.replicas


def test_a_sequence_gap_is_refused():
    kv = KVCacheManager(8, BLOCK)
    index = KVIndex()
    start_following(index, "a", kv)
    run_prompt(kv, "x", list(range(5)))
    kv.take_events()  # batch 1 lost
    run_prompt(kv, "y", list(range(20, 25)))
    assert index.apply("a", kv.take_events()) is Fate.GAP


def pool_stats(total: int = 1 << 20, used: int = 0, cached: int = 0) -> EngineStats:
    return EngineStats(running=0, waiting=0, kv_blocks_total=total, kv_blocks_used=used, kv_blocks_cached=cached,
                       num_preemptions=0, grammars=None, speculative=None, host_tier=None, waiting_by_priority=(),
                       lora_adapters=(), queued_tokens=0, step_cost=None, working_set_blocks=0)


def hub_news(version: int, replicas: dict[str, ReplicaNews], followers: int) -> HubNews:
    """A hub's answer that names only the replicas it has news of."""
    return HubNews(version, replicas, followers, frozenset(replicas))


def news_of(tokens: list[int], block_size: int = BLOCK, hash_check: str | None = None,
            stats: EngineStats | None = None, sent_at: float = 0.0) -> ReplicaNews:
    """A replica's news as the hub gives it: a snapshot holding the blocks of `tokens`."""
    blocks = hash_block_chain(tokens, block_size)
    heartbeat = Heartbeat(7, 1, sent_at, dataclasses.replace(stats or pool_stats(), kv_blocks_cached=len(blocks)))
    return ReplicaNews(block_size, hash_check or hash_check_value(block_size), heartbeat, None,
                       BlockSnapshot(7, 1, blocks))


@given(length=st.integers(0, 400), holes=st.lists(st.integers(0, 400), max_size=3), start=st.integers(0, 400))
@example(length=300, holes=[31], start=0)
@example(length=300, holes=[32], start=0)
@example(length=300, holes=[95], start=0)
@example(length=300, holes=[96], start=0)
@example(length=300, holes=[], start=5)
def test_a_held_run_ends_at_the_first_block_missing(length, holes, start):
    """`held_run` checks long chains in doubling slices: the run ends where it should whether
    the first missing block opens a slice, closes it or sits inside it."""
    chain = [i.to_bytes(32, "big") for i in range(length)]
    held = set(chain) - {chain[h] for h in holes if h < length}
    start = min(start, length)
    expected = next((i for i in range(start, length) if chain[i] not in held), length) - start
    assert held_run(held, chain, start) == expected


def test_follower_distrusts_a_replica_that_hashes_differently():
    follower = KVIndexFollower("test-app", BLOCK)
    good = news_of(list(range(8)))
    other_size = news_of(list(range(8)), block_size=8)
    other_hash = news_of(list(range(8)), hash_check="00" * 32)
    follower.apply(hub_news(1, {"good": good, "size": other_size, "hash": other_hash}, 1))
    assert set(follower.index.replicas) == {"good"}
    assert follower.rejected == {"size", "hash"}
    follower.apply(hub_news(2, {"size": other_size}, 1))
    assert not follower.index.replicas


def test_a_large_index_leaves_the_garbage_collector_after_a_snapshot(monkeypatch):
    """Its block sets are frozen (never walked by a collection) once the index is large."""
    from kvserve.router import kv_follower

    monkeypatch.setattr(kv_follower, "FREEZE_AT_BLOCKS", 4)
    small, large = KVIndexFollower("test-app", BLOCK), KVIndexFollower("test-app", BLOCK)
    try:
        small.apply(hub_news(1, {"r": news_of(list(range(3 * BLOCK)))}, 1))
        assert any(o is small.index.replicas["r"].blocks for o in gc.get_objects())
        large.apply(hub_news(1, {"r": news_of(list(range(8 * BLOCK)))}, 1))
        assert not any(o is large.index.replicas["r"].blocks for o in gc.get_objects())
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def follower_with(holdings: dict[str, list[int]], stats: dict[str, EngineStats] | None = None) -> KVIndexFollower:
    """A follower whose replicas hold the leading blocks of the given token lists."""
    follower = KVIndexFollower("scoring-test", BLOCK)
    stats = stats or {}
    follower.apply(hub_news(1, {name: news_of(tokens, stats=stats.get(name)) for name, tokens in holdings.items()}, 1))
    return follower


def test_a_follower_folds_an_answer_in_slices_and_ends_where_apply_does(monkeypatch):
    """While it folds a hub answer in, the follower hands the event loop back (the routing
    decisions of the process run on that loop), and it ends with what `apply` gives."""
    import asyncio

    from kvserve.router import kv_follower

    monkeypatch.setattr(kv_follower, "APPLY_SLICE_S", 0.0)  # a slice a replica
    answer = hub_news(1, {f"r{i}": news_of(list(range(i, i + 8 * BLOCK)), stats=timed(pool_stats(), 100 * i))
                         for i in range(20)}, 1)
    at_once, sliced = KVIndexFollower("at-once", BLOCK), KVIndexFollower("sliced", BLOCK)
    at_once.apply(answer)
    seen = []

    async def fold_beside_a_neighbour():
        async def neighbour():
            while True:
                seen.append(len(sliced.index.replicas))
                await asyncio.sleep(0)

        task = asyncio.create_task(neighbour())
        await asyncio.sleep(0)
        await sliced.apply_in_slices(answer)
        task.cancel()

    asyncio.run(fold_beside_a_neighbour())
    assert any(0 < count < 20 for count in seen)
    names = list(answer.replicas)
    blocks = {r: s.blocks for r, s in at_once.index.replicas.items()}
    assert {r: s.blocks for r, s in sliced.index.replicas.items()} == blocks
    assert sliced.figures(names).tolist() == at_once.figures(names).tolist()
    assert sliced.deployment_step_cost() == at_once.deployment_step_cost()


def test_scorer_prefers_the_holder_until_it_is_too_busy():
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(40))
    follower = follower_with({"a": [], "b": prompt[:32], "c": prompt[:8]})
    scorer = KVScorer(follower, BLOCK, RouterOptions(cost_unit="tokens", load_cost_tokens=4, max_imbalance=2))
    hashes = hash_block_chain(prompt, BLOCK)
    order, reason = scorer.rank(["a", "b", "c"], hashes, len(prompt))
    assert order[:2] == [1, 2] and reason == "cached_prefix"
    scorer.in_flight["b"] = 3  # 3 more than the least busy: held back
    order, reason = scorer.rank(["a", "b", "c"], hashes, len(prompt))
    assert order[0] == 2 and order[-1] == 1 and reason == "load_guard"


def timed(stats: EngineStats, queued_tokens: int, running: int = 0) -> EngineStats:
    """`stats` of a replica whose steps cost 10 ms plus 1 ms per prompt token and 0.1 ms per
    running sequence, with `queued_tokens` still to compute."""
    return dataclasses.replace(stats, queued_tokens=queued_tokens, running=running,
                               step_cost=StepCost(0.01, 1e-3, 1e-4, tokens_per_step=64))


def test_in_seconds_a_cache_hit_is_worth_its_prefill_time_against_a_queue():
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(48))
    hashes = hash_block_chain(prompt, BLOCK)
    options = EXACT_SECONDS

    def first_choice(holder_queue: int, other_queue: int) -> str:
        stats = {"holder": timed(pool_stats(100), holder_queue), "other": timed(pool_stats(100), other_queue)}
        scorer = KVScorer(follower_with({"holder": prompt[:40], "other": []}, stats), BLOCK, options)
        return ["holder", "other"][scorer.rank(["holder", "other"], hashes, len(prompt))[0][0]]

    assert first_choice(0, 0) == "holder"
    assert first_choice(30, 0) == "holder"  # 30 + 8 tokens to compute there, 48 on the other
    assert first_choice(60, 0) == "other"  # 68 there: two steps' base as well
    assert first_choice(60, 40) == "holder"  # 68 against 88


def test_in_seconds_a_prompt_mostly_cached_nowhere_is_placed_by_load_alone():
    """With one router, a history no replica holds half of (met for the first time) goes where
    the queue is shortest, as if nothing of it were cached: its shared prefix spreads to more
    replicas."""
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(40))
    hashes = hash_block_chain(prompt, BLOCK)

    def first_choice(held: int, options: RouterOptions = EXACT_SECONDS, routers: int = 1) -> str:
        stats = {"holder": timed(pool_stats(100), 10), "other": timed(pool_stats(100), 0)}
        follower = follower_with({"holder": prompt[:held], "other": []}, stats)
        follower.routers = routers  # as the hub counted its followers
        scorer = KVScorer(follower, BLOCK, options)
        return ["holder", "other"][scorer.rank(["holder", "other"], hashes, len(prompt))[0][0]]

    assert first_choice(held=16) == "other"  # 40% held: 10 + 40 tokens there against 40 here
    assert first_choice(held=16, options=EXACT_SECONDS.model_copy(update={"min_cached_share": 0})) == "holder"
    assert first_choice(held=24) == "holder"  # 60% held: 10 + 16 tokens there
    assert first_choice(held=16, routers=2) == "holder"  # one router's rule (cost_jitter is 0 here)


def test_in_seconds_while_requests_wait_for_room_a_prompt_stays_where_it_is_cached():
    """Near saturation a recompute elsewhere costs every later request its time: the
    request's own work is charged again for each request waiting on a replica (the median)."""
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(48))
    hashes = hash_block_chain(prompt, BLOCK)

    def first_choice(waiting: int, options: RouterOptions = EXACT_SECONDS) -> str:
        def queue(tokens: int) -> EngineStats:
            return dataclasses.replace(timed(pool_stats(100), tokens), waiting=waiting)

        scorer = KVScorer(follower_with({"holder": prompt[:40], "other": []},
                                        {"holder": queue(60), "other": queue(10)}), BLOCK, options)
        return ["holder", "other"][scorer.rank(["holder", "other"], hashes, len(prompt))[0][0]]

    # 68 tokens in two steps there (88 ms), 58 in one on the other (68 ms): its own first token is sooner there
    assert first_choice(waiting=0) == "other"
    assert first_choice(waiting=3, options=EXACT_SECONDS.model_copy(update={"waiting_work_charge": 0})) == "other"
    assert first_choice(waiting=3) == "holder"  # + 3 x 8 ms against + 3 x 48 ms


def test_in_seconds_a_new_conversation_goes_where_it_will_decode_and_a_continued_one_stays():
    """A conversation stays where it starts, so where the replicas' decoding load has grown
    uneven and conversations have later turns, its first request is placed for its decoding
    too: charged what each replica's running sequences add to `decode_steps_ahead` steps. A
    later turn, whose history only its own replica holds, is placed for its first token; and
    so is every request where the load is even or requests come one per conversation."""
    from kvserve.router.kv_scoring import KVScorer

    system, history = list(range(32)), list(range(32)) + list(range(100, 108))
    start = system + list(range(200, 216))  # 16 tokens to compute on either: about 30 ms on busy, 36 on quiet

    def first_choice(running: dict[str, int], prompt: list[int], later_turns: bool = True,
                     holdings: dict[str, list[int]] | None = None) -> str:
        stats = {"busy": timed(pool_stats(100), 0, running=running["busy"]),
                 "quiet": timed(pool_stats(100), 10, running=running["quiet"])}
        scorer = KVScorer(follower_with(holdings or {"busy": system, "quiet": system}, stats), BLOCK, EXACT_SECONDS)
        earlier = list(range(500, 540))  # another conversation, with or without a second turn
        scorer.record("busy", hash_block_chain(earlier, BLOCK))
        if later_turns:
            scorer.record("busy", hash_block_chain(earlier + list(range(600, 620)), BLOCK))
        return ["busy", "quiet"][scorer.rank(["busy", "quiet"], hash_block_chain(prompt, BLOCK), len(prompt))[0][0]]

    uneven = {"busy": 20, "quiet": 2}  # variance 81 over a mean of 11
    assert first_choice(uneven, start) == "quiet"  # 512 steps x 0.1 ms x 18 more sequences on busy
    assert first_choice(uneven, start, later_turns=False) == "busy"  # one request per conversation
    assert first_choice({"busy": 3, "quiet": 1}, start) == "busy"  # variance 1 over a mean of 2: even enough
    assert first_choice(uneven, [7] * 48, holdings={"busy": [], "quiet": []}) == "quiet"  # nothing cached anywhere
    turn = history + list(range(300, 308))  # 8 tokens to compute on busy, 24 on quiet
    assert first_choice(uneven, turn, holdings={"busy": history, "quiet": system}) == "busy"


def test_in_seconds_a_new_conversation_seeds_an_idle_replica_when_every_holder_is_busy():
    """A cluster larger than the holders of its shared prefix: a conversation that starts on
    the prefix goes to a replica that caches and runs nothing, though its prefill is longer
    there, while every holder has sequences running; not where a holder is idle, nor for a later
    turn, nor where conversations have no later turns, nor with `seed_idle_replicas` off."""
    from kvserve.router.kv_scoring import KVScorer

    system, other = list(range(32)), list(range(900, 932))
    start = system + list(range(200, 216))

    def first_choice(prompt: list[int], holder_running: int = 3, later_turns: bool = True,
                     spare_holds: list[int] | None = None, history: list[int] | None = None,
                     options: RouterOptions = EXACT_SECONDS) -> str:
        names = ["holder", "second", "spare"]
        holdings = {"holder": history or system, "second": system, "spare": spare_holds or []}
        stats = {"holder": timed(pool_stats(100), 0, running=holder_running),
                 "second": timed(pool_stats(100), 0, running=2), "spare": timed(pool_stats(100), 0)}
        scorer = KVScorer(follower_with(holdings, stats), BLOCK, options)
        earlier = list(range(500, 540))
        scorer.record("second", hash_block_chain(earlier, BLOCK))
        if later_turns:
            scorer.record("second", hash_block_chain(earlier + list(range(600, 620)), BLOCK))
        return names[scorer.rank(names, hash_block_chain(prompt, BLOCK), len(prompt))[0][0]]

    assert first_choice(start) == "spare"  # 48 tokens to compute there, 16 on a holder
    assert first_choice(start, holder_running=0) == "holder"  # a holder is idle: it takes it
    assert first_choice(start, later_turns=False) in ("holder", "second")
    assert first_choice(start, spare_holds=other) in ("holder", "second")  # it caches something already
    assert first_choice(start, options=EXACT_SECONDS.model_copy(update={"seed_idle_replicas": False})) in (
        "holder", "second")
    history = system + list(range(200, 216)) + list(range(300, 320))
    assert first_choice(history + list(range(400, 408)), history=history) == "holder"  # a later turn stays


def test_a_prompt_no_replica_holds_goes_to_a_spare_replica_however_many_routers_jitter():
    """Computed whole anywhere, a prompt no replica holds goes to a replica that caches and runs
    nothing: with one router its tie-break does so already, and with several the jitter must
    not send it as often to an idle replica holding another prefix, which would then take the
    later requests of both. Not where the spare replica lacks the request's LoRA adapter and
    another has it, nor with `seed_idle_replicas` off."""
    from kvserve.router.kv_scoring import KVScorer

    names = ["busy", "idle", "spare"]
    prompt = list(range(48))

    def choices(routers: int, options: RouterOptions = RouterOptions(), lora_name: str | None = None) -> Counter:
        with_adapter = dataclasses.replace(timed(pool_stats(100), 0), lora_adapters=("tuned",))
        stats = {"busy": timed(pool_stats(100), 1, running=1), "idle": with_adapter, "spare": timed(pool_stats(100), 0)}
        follower = follower_with({"busy": list(range(900, 932)), "idle": list(range(800, 832)), "spare": []}, stats)
        follower.routers = routers
        scorer = KVScorer(follower, BLOCK, options)
        hashes = hash_block_chain(prompt, BLOCK, lora_name=lora_name)
        return Counter(names[scorer.rank(names, hashes, len(prompt), lora_name=lora_name)[0][0]] for _ in range(200))

    random.seed(5)  # the scorer draws from a generator it seeds from `random`
    assert choices(routers=1) == {"spare": 200}
    assert choices(routers=16) == {"spare": 200}
    unseeded = choices(routers=16, options=RouterOptions(seed_idle_replicas=False))
    assert unseeded["idle"] > 0 and unseeded["spare"] > 0  # within the jitter of each other
    assert choices(routers=1, lora_name="tuned") == {"idle": 200}  # it saves loading the adapter


def test_the_decode_load_is_averaged_over_heartbeats_and_its_spread_measured():
    from kvserve.router.kv_follower import DECODE_LOAD_WINDOW_S

    follower = KVIndexFollower("scoring-test", BLOCK)

    def heartbeat(version: int, sent_at: float, running: dict[str, int]) -> None:
        follower.apply(hub_news(version, {name: news_of([], stats=timed(pool_stats(), 0, running=count),
                                                       sent_at=sent_at) for name, count in running.items()}, 1))

    heartbeat(1, 0.0, {"a": 20, "b": 2})
    assert follower.decode_load == {"a": 20.0, "b": 2.0}
    assert follower.decode_dispersion() == pytest.approx(81 / 11)
    heartbeat(2, DECODE_LOAD_WINDOW_S, {"a": 0, "b": 2})
    assert follower.decode_load["a"] == pytest.approx(20 * math.exp(-1))
    heartbeat(3, DECODE_LOAD_WINDOW_S, {"a": 5, "b": 2})  # the same heartbeat again: no new sample
    assert follower.decode_load["a"] == pytest.approx(20 * math.exp(-1))
    follower.forget("a")
    assert follower.decode_dispersion() == 0.0


def test_a_prompt_holding_an_earlier_prompt_continues_a_conversation():
    from kvserve.router.conversations import ConversationLog

    log = ConversationLog(window_s=60.0)
    first = hash_block_chain(list(range(40)), BLOCK)
    second = hash_block_chain(list(range(40)) + list(range(100, 120)), BLOCK)
    assert not log.continues(first)
    log.sent(0.0, first)
    assert log.continues(second)
    assert not log.continues(hash_block_chain(list(range(36)) + [7] * 24, BLOCK))  # only part of it
    log.sent(1.0, second)
    assert log.later_turns(routers=1) == 1.0  # two requests, one conversation
    for k in range(8):
        log.sent(2.0, hash_block_chain([1000 + k] * 8, BLOCK))
    assert log.later_turns(routers=1) == pytest.approx(1 / 9)
    assert log.later_turns(routers=4) == pytest.approx(4 / 6)  # it saw one continuation in four
    log.sent(61.5, hash_block_chain([2000] * 8, BLOCK))  # the first two sends are past the window
    assert not log.continues(second) and log.later_turns(routers=1) == 0.0


def test_a_withdrawn_send_counts_neither_as_a_turn_nor_as_a_prompt_to_continue():
    """A refused send and its retry are one request: only the retry counts."""
    from kvserve.router.conversations import ConversationLog

    log = ConversationLog(window_s=60.0)
    first = hash_block_chain(list(range(40)), BLOCK)
    second = hash_block_chain(list(range(40)) + list(range(100, 120)), BLOCK)
    log.sent(0.0, first)
    log.sent(1.0, second)
    log.withdraw(second)
    assert log.later_turns(routers=1) == 0.0  # one conversation, no later turn
    log.sent(2.0, second)  # the retry
    assert log.later_turns(routers=1) == 1.0
    log.withdraw(hash_block_chain([9] * 8, BLOCK))  # never sent: nothing changes
    assert log.later_turns(routers=1) == 1.0 and log.continues(second + [object()])


def test_in_seconds_every_replica_counts_the_median_step_cost():
    """One model on one kind of GPU: the replicas' fits are pooled (their median), so one
    replica's odd fit (here a step ten times cheaper) does not draw the traffic to it; a
    replica that has measured nothing counts the same cost."""
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(48))
    cheap = dataclasses.replace(timed(pool_stats(100), 100), step_cost=StepCost(1e-3, 1e-4, 1e-5, tokens_per_step=64))
    stats = {"cheap": cheap, "a": timed(pool_stats(100), 0), "b": timed(pool_stats(100), 0), "new": pool_stats(100)}
    scorer = KVScorer(follower_with({"cheap": prompt[:40], "a": [], "b": [], "new": []}, stats), BLOCK,
                      EXACT_SECONDS)
    assert scorer.rank(["cheap", "a", "b", "new"], hash_block_chain(prompt, BLOCK), len(prompt))[0][-1] == 0


def test_the_deployment_step_cost_follows_the_heartbeats():
    cheap = StepCost(0.002, 1e-4, 1e-5, tokens_per_step=64)
    stats = {"a": timed(pool_stats(), 0), "b": timed(pool_stats(), 0), "c": pool_stats()}
    follower = follower_with({"a": [], "b": [], "c": []}, stats)
    assert follower.deployment_step_cost() == (0.01, 1e-3, 1e-4, 64)  # "c" has measured nothing yet
    stats["a"] = dataclasses.replace(stats["a"], step_cost=cheap)
    follower.apply(hub_news(2, {name: news_of([], stats=s) for name, s in stats.items()}, 1))
    assert follower.deployment_step_cost() == pytest.approx((0.006, 5.5e-4, 5.5e-5, 64))
    follower.forget("b")
    assert follower.deployment_step_cost() == (0.002, 1e-4, 1e-5, 64)
    follower.forget("a")
    assert follower.deployment_step_cost() is None


def test_in_seconds_before_any_step_is_measured_a_token_counts_a_second():
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(48))
    hashes = hash_block_chain(prompt, BLOCK)
    untimed = {"a": dataclasses.replace(pool_stats(100), queued_tokens=30), "b": pool_stats(100)}
    scorer = KVScorer(follower_with({"a": prompt[:40], "b": []}, untimed), BLOCK, EXACT_SECONDS)
    assert scorer.rank(["a", "b"], hashes, len(prompt))[0] == [0, 1]  # 30 + 8 tokens against 48
    untimed["a"] = dataclasses.replace(untimed["a"], queued_tokens=50)
    scorer = KVScorer(follower_with({"a": prompt[:40], "b": []}, untimed), BLOCK, EXACT_SECONDS)
    assert scorer.rank(["a", "b"], hashes, len(prompt))[0] == [1, 0]  # 58 against 48


def test_in_seconds_our_sends_count_their_uncached_tokens_until_a_heartbeat_does():
    """A burst of long prompts to one replica, decided before Serve counts any of them in
    flight and faster than the replica's heartbeats: each send queues its uncached tokens
    there at once, not a fixed token count per request. The next heartbeat counts the queue
    itself; a request of ours in flight beyond those it reported still counts."""
    from kvserve.router.kv_scoring import KVScorer

    long_prompt, short_prompt = list(range(1000, 1400)), list(range(200))
    now = [1.0]
    follower = KVIndexFollower("scoring-test", BLOCK, clock=lambda: now[0])

    def heartbeat(version: int) -> None:
        stats = {"a": timed(pool_stats(1000), 0), "b": timed(pool_stats(1000), 0)}
        holdings = {"a": short_prompt[:192], "b": []}
        follower.apply(hub_news(version, {name: news_of(tokens, stats=stats[name], sent_at=now[0])
                                         for name, tokens in holdings.items()}, 1))

    heartbeat(1)
    scorer = KVScorer(follower, BLOCK, EXACT_SECONDS)
    short = hash_block_chain(short_prompt, BLOCK)
    assert scorer.rank(["a", "b"], short, len(short_prompt))[0] == [0, 1]  # 8 tokens to compute against 200
    now[0] = 1.1
    scorer.rank(["a", "b"], hash_block_chain(long_prompt, BLOCK), len(long_prompt))  # a tie: neither holds it
    scorer.record("a", hash_block_chain(long_prompt, BLOCK))
    assert scorer.rank(["a", "b"], short, len(short_prompt))[0] == [1, 0]  # 400 + 8 against 200
    now[0] = 1.2
    heartbeat(2)  # the long prompt is done
    assert scorer.rank(["a", "b"], short, len(short_prompt))[0] == [0, 1]
    scorer.in_flight["a"] += 1  # Serve counts it in flight; the heartbeat reported nothing running
    assert scorer.rank(["a", "b"], short, len(short_prompt))[0] == [1, 0]


def test_the_sends_since_each_replicas_heartbeat_are_counted_as_a_recount_would():
    """The counts kept as sends are noted, against counting each replica's sends after its
    latest heartbeat's arrival from scratch, through sends at the same instant as a
    heartbeat, heartbeats in between and more sends than are kept."""
    import random

    from kvserve.router.kv_scoring import _SENDS_KEPT, KVScorer

    rng = random.Random(5)
    now = [0.0]
    follower = KVIndexFollower("recount-test", BLOCK, clock=lambda: now[0])
    names = ["a", "b", "c"]
    sent_at = dict.fromkeys(names, 0.0)  # of each replica's latest heartbeat
    version = 0

    def heartbeat(name: str) -> None:  # the hub's news names every replica; one has a new heartbeat
        nonlocal version
        version += 1
        sent_at[name] = now[0]
        follower.apply(hub_news(version, {r: news_of([], stats=timed(pool_stats(1000), 0), sent_at=sent_at[r])
                                         for r in names}, 1))

    heartbeat("a")
    scorer = KVScorer(follower, BLOCK, EXACT_SECONDS)
    prompt = hash_block_chain(list(range(3 * BLOCK)), BLOCK)
    for _ in range(1000):
        now[0] += rng.choice([0.0, 0.0, 0.01])
        if rng.random() < 0.1:
            heartbeat(rng.choice(names))
        else:
            scorer.rank(names, prompt, 3 * BLOCK)
            scorer.record(rng.choice(names), prompt)
        recount = {}
        for name in names:
            heard_at = follower.reported_at(name)
            count = sum(1 for at, _ in scorer.sent_tokens[name] if at > heard_at)
            if count:
                recount[name] = count
        assert scorer._sends_since_heartbeat() == recount
    assert max(len(sends) for sends in scorer.sent_tokens.values()) == _SENDS_KEPT


def test_in_seconds_several_routers_spread_near_ties_and_keep_clear_choices():
    """Routers that read the same reports must not all pick the same replica at once: with
    several, costs within `cost_jitter` (20%) of each other share the traffic, and a replica
    clearly cheaper still gets it all. One router alone ranks by the cost as it is."""
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(48))
    hashes = hash_block_chain(prompt, BLOCK)

    def choices(queues: dict[str, int], routers: int) -> Counter:
        stats = {name: timed(pool_stats(100), queued) for name, queued in queues.items()}
        follower = follower_with({name: list(range(1000 + 100 * k, 1032 + 100 * k)) for k, name in enumerate(queues)},
                                 stats)  # each holds a prefix of its own: none is a spare replica to seed
        follower.routers = routers  # as the hub counted its followers
        scorer = KVScorer(follower, BLOCK, RouterOptions())
        return Counter(list(queues)[scorer.rank(list(queues), hashes, len(prompt))[0][0]] for _ in range(300))

    near = {"a": 0, "b": 4, "c": 8}  # 58, 62 and 66 ms predicted
    assert choices(near, routers=1) == {"a": 300}
    random.seed(3)  # the scorer draws from a generator it seeds from `random`
    spread = choices(near, routers=4)  # the cheapest gets the most: about 234, 59 and 7
    assert spread["a"] > spread["b"] > spread["c"] > 0
    assert choices({"a": 0, "b": 60}, routers=4) == {"a": 300}  # 48 against 108 tokens and a second step


def test_the_load_guard_grows_with_the_load():
    """Long requests keep many in flight everywhere: a swing of a few more than the least busy
    replica must not send a prefix away from its holder; twice the least busy's load does."""
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(40))
    follower = follower_with({"a": [], "b": prompt[:32]})
    scorer = KVScorer(follower, BLOCK, RouterOptions(cost_unit="tokens", load_cost_tokens=0, max_imbalance=4, imbalance_share=0.5))
    hashes = hash_block_chain(prompt, BLOCK)
    scorer.in_flight.update({"a": 20, "b": 29})  # 9 more: within half of 20
    assert scorer.rank(["a", "b"], hashes, len(prompt)) == ([1, 0], "cached_prefix")
    scorer.in_flight["b"] = 31
    assert scorer.rank(["a", "b"], hashes, len(prompt)) == ([0, 1], "load_guard")


def test_a_cost_in_seconds_holds_back_only_a_far_busier_holder():
    """The predicted time keeps a prefix on its holder whatever that holder decodes; the loose
    bound of `seconds_max_imbalance` stops it from taking a hot prefix's every request."""
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(40))
    follower = follower_with({"a": [], "b": prompt[:32]})
    scorer = KVScorer(follower, BLOCK, RouterOptions())
    hashes = hash_block_chain(prompt, BLOCK)
    scorer.in_flight.update({"a": 10, "b": 10 + RouterOptions().seconds_max_imbalance})
    assert scorer.rank(["a", "b"], hashes, len(prompt)) == ([1, 0], "cached_prefix")
    scorer.in_flight["b"] += 1
    assert scorer.rank(["a", "b"], hashes, len(prompt)) == ([0, 1], "load_guard")


def test_scorer_places_a_new_prefix_where_fewer_blocks_are_in_use():
    from kvserve.router.kv_scoring import KVScorer

    follower = follower_with({"a": [], "b": []}, stats={"a": pool_stats(10, used=9), "b": pool_stats(10, used=1)})
    scorer = KVScorer(follower, BLOCK)
    order, reason = scorer.rank(["a", "b"], hash_block_chain(list(range(12)), BLOCK), 12)
    assert order == [1, 0] and reason == "no_cached_prefix"


def test_scorer_counts_idle_cached_blocks_as_occupied():
    """Blocks that only sit in the prefix cache show as free in the engine's usage; the index
    knows they are there, and a new prefix goes where it evicts nothing."""
    from kvserve.router.kv_scoring import KVScorer

    total = pool_stats(12)
    follower = follower_with({"a": list(range(100, 140)), "b": list(range(200, 208))},
                             stats={"a": total, "b": total})
    scorer = KVScorer(follower, BLOCK)
    prompt = list(range(16))
    assert scorer.rank(["a", "b"], hash_block_chain(prompt, BLOCK), len(prompt))[0] == [1, 0]


def test_scorer_weighs_evicting_wanted_blocks_against_load():
    """Blocks that recent traffic keeps alive cost their recomputation when a new prefix
    pushes them out; blocks only sitting in the cache cost little more than nothing."""
    from kvserve.router.kv_scoring import KVScorer

    pool = pool_stats(10)
    follower = follower_with({"wanted": [], "stale": list(range(100, 140)), "busy": []},
                             stats={"wanted": pool, "stale": pool, "busy": pool})
    scorer = KVScorer(follower, BLOCK, RouterOptions(load_cost_tokens=4))
    scorer.record("wanted", hash_block_chain(list(range(500, 500 + 10 * BLOCK)), BLOCK))  # its whole pool
    scorer.in_flight["busy"] = 1  # costs 4 tokens; 2 blocks pushing out wanted ones cost 32
    prompt = list(range(24))
    assert scorer.rank(["wanted", "stale", "busy"], hash_block_chain(prompt, BLOCK), len(prompt))[0] == [1, 2, 0]


def test_a_pool_other_routers_keep_wanted_counts_as_wanted():
    """Another ingress router's traffic keeps one replica's whole pool wanted, as the replica's
    heartbeat counts it (`working_set_blocks`). This router sent it nothing, and still places a
    new prefix on the replica whose pool nobody wants, though the other has more free room.
    A router alone sends all the traffic: its own count is the whole, and the room decides."""
    from kvserve.router.kv_scoring import KVScorer

    wanted_elsewhere = dataclasses.replace(pool_stats(10), working_set_blocks=10)
    follower = follower_with({"wanted": [], "stale": list(range(100, 120))},
                             stats={"wanted": wanted_elsewhere, "stale": pool_stats(10)})
    follower.routers = 2  # as the hub counted its followers
    scorer = KVScorer(follower, BLOCK)
    prompt = list(range(24))
    for _ in range(8):  # equal costs would go to the most free room: "wanted"
        assert scorer.rank(["wanted", "stale"], hash_block_chain(prompt, BLOCK), len(prompt))[0] == [1, 0]
    follower.routers = 1
    assert scorer.rank(["wanted", "stale"], hash_block_chain(prompt, BLOCK), len(prompt))[0] == [0, 1]


def test_a_system_prompt_held_by_one_replica_does_not_pull_every_conversation_there():
    """Every conversation opens with the same system prompt, which one replica caches: it
    saves each new conversation a little there, and the conversations would pile up on it."""
    from kvserve.router.kv_scoring import KVScorer

    system = list(range(6 * BLOCK))  # most of each prompt (less would be placed by load alone: min_cached_share)
    pool = pool_stats(20)  # a conversation wants half
    follower = follower_with({"a": system, "b": [], "c": [], "d": []}, stats=dict.fromkeys("abcd", pool))
    scorer = KVScorer(follower, BLOCK)
    chosen = []
    for k in range(4):
        prompt = system + list(range(1000 * (k + 1), 1000 * (k + 1) + 4 * BLOCK))
        hashes = hash_block_chain(prompt, BLOCK)
        order, _ = scorer.rank(list("abcd"), hashes, len(prompt))
        chosen.append("abcd"[order[0]])
        scorer.record(chosen[-1], hashes)
    assert chosen[0] == "a" and sorted(chosen) == list("abcd"), chosen


def test_between_equal_costs_the_request_goes_where_fewer_as_urgent_requests_wait():
    """Two idle-cache replicas with two requests waiting each: a priority-0 request would wait
    behind both priority-0 ones on one, behind none of the priority-10 ones on the other. A
    priority-10 request waits behind two either way; a cached prefix still outweighs a queue."""
    from kvserve.router.kv_scoring import KVScorer

    def queue(*pairs):
        return dataclasses.replace(pool_stats(100), waiting=2, waiting_by_priority=pairs)

    prompt = list(range(16))
    hashes = hash_block_chain(prompt, BLOCK)
    follower = follower_with({"urgent": [], "relaxed": [], "holder": prompt},
                             stats={"urgent": queue((0, 2)), "relaxed": queue((10, 2)), "holder": queue((0, 2))})
    scorer = KVScorer(follower, BLOCK)
    for _ in range(8):  # equal costs otherwise go either way at random
        assert scorer.rank(["urgent", "relaxed"], hashes, len(prompt), priority=0)[0] == [1, 0]
    assert {scorer.rank(["urgent", "relaxed"], hashes, len(prompt), priority=10)[0][0] for _ in range(32)} == {0, 1}
    assert scorer.rank(["relaxed", "holder"], hashes, len(prompt), priority=0)[0] == [1, 0]


def adapter_follower() -> KVIndexFollower:
    """Two replicas caching nothing; "holder" has LoRA adapter "tuned" in a device slot."""
    holding = dataclasses.replace(pool_stats(100), lora_adapters=("other", "tuned"))
    return follower_with({"bare": [], "holder": []}, stats={"bare": pool_stats(100), "holder": holding})


def test_a_replica_holding_the_adapter_wins_at_equal_cache():
    """It saves the adapter's load, worth more than a request in flight; at cost 0 the router
    ignores where adapters are."""
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(16))
    hashes = hash_block_chain(prompt, BLOCK, lora_name="tuned")
    scorer = KVScorer(adapter_follower(), BLOCK, RouterOptions(load_cost_tokens=4))
    scorer.in_flight["holder"] = 1
    for _ in range(8):  # equal costs otherwise go either way at random
        assert scorer.rank(["bare", "holder"], hashes, len(prompt), lora_name="tuned")[0] == [1, 0]
    assert scorer.rank(["bare", "holder"], hashes, len(prompt))[0] == [0, 1]  # the base model: load decides
    unaware = KVScorer(adapter_follower(), BLOCK, RouterOptions(lora_load_cost_tokens=0))
    assert {unaware.rank(["bare", "holder"], hashes, len(prompt), lora_name="tuned")[0][0] for _ in range(32)} == {0, 1}


def test_an_adapter_just_sent_counts_as_resident_until_recent_s_has_passed():
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(16))
    hashes = hash_block_chain(prompt, BLOCK, lora_name="fresh")  # an adapter no heartbeat names
    scorer = KVScorer(adapter_follower(), BLOCK, RouterOptions(load_cost_tokens=4, recent_s=5.0))
    now = [100.0]
    scorer.working_sets.clock = lambda: now[0]
    scorer.record("bare", hash_block_chain([99] * 16, BLOCK, lora_name="fresh"), "fresh")  # another prompt
    scorer.in_flight["bare"] = 1
    assert scorer.rank(["bare", "holder"], hashes, len(prompt), lora_name="fresh")[0] == [0, 1]
    now[0] += 6.0
    assert {scorer.rank(["bare", "holder"], hashes, len(prompt), lora_name="fresh")[0][0] for _ in range(8)} == {1}


def test_a_busy_adapter_holder_loses_to_a_replica_without_it_past_the_load_guard():
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(16))
    hashes = hash_block_chain(prompt, BLOCK, lora_name="tuned")
    scorer = KVScorer(adapter_follower(), BLOCK, RouterOptions(cost_unit="tokens", load_cost_tokens=4, max_imbalance=2))
    scorer.in_flight["holder"] = 2
    assert scorer.rank(["bare", "holder"], hashes, len(prompt), lora_name="tuned")[0] == [1, 0]
    scorer.in_flight["holder"] = 3
    assert scorer.rank(["bare", "holder"], hashes, len(prompt), lora_name="tuned")[0] == [0, 1]


def stored(tokens: list[int], priority: int, medium: str = DEVICE_MEDIUM) -> BlockStored:
    return BlockStored(hash_block_chain(tokens, BLOCK), None, tokens, BLOCK, lora_name=None, medium=medium,
                       priority=priority)


def test_the_index_follows_which_device_blocks_are_retained_above_the_default():
    index = KVIndex()
    index.load_snapshot("a", BLOCK, BlockSnapshot(7, 1, []), Heartbeat(7, 1, 0.0, pool_stats()), now=0.0)
    system, other = list(range(8)), list(range(100, 108))
    events = [stored(system, 100), stored(other, DEFAULT_RETENTION_PRIORITY), stored(list(range(200, 204)), 90, "cpu")]
    assert index.apply("a", KVEventBatch(7, 2, 0.0, events)) is Fate.APPLIED
    assert index.replicas["a"].retained == set(hash_block_chain(system, BLOCK))
    assert index.with_retained_blocks == {"a"}
    removed = BlockRemoved(hash_block_chain(system, BLOCK)[1:], medium=DEVICE_MEDIUM)
    index.apply("a", KVEventBatch(7, 3, 0.0, [removed, stored(other, 60)]))
    assert index.replicas["a"].retained == set(hash_block_chain(system, BLOCK)[:1] + hash_block_chain(other, BLOCK))
    index.apply("a", KVEventBatch(7, 4, 0.0, [AllBlocksCleared()]))
    assert not index.replicas["a"].retained and not index.with_retained_blocks


def test_a_new_prefix_counts_retained_blocks_as_staying():
    """Two pools of ten blocks, each wanted at eight by a conversation on a four-block system
    prompt. Where the system prompt is retained it stays whatever comes, so a new prefix there
    competes for six blocks of which four are wanted (0.67), not ten of which eight are (0.8)."""
    from kvserve.router.kv_scoring import KVScorer

    system = list(range(4 * BLOCK))
    pool = pool_stats(10)
    follower = follower_with({"retains": [], "plain": []}, stats={"retains": pool, "plain": pool})
    for name, priority in [("retains", 100), ("plain", DEFAULT_RETENTION_PRIORITY)]:
        follower.index.apply(name, KVEventBatch(7, 2, 0.0, [stored(system, priority)]))
    scorer = KVScorer(follower, BLOCK, RouterOptions(load_cost_tokens=0))
    for name, start in [("retains", 1000), ("plain", 2000)]:
        scorer.record(name, hash_block_chain(system + list(range(start, start + 4 * BLOCK)), BLOCK))
    prompt = list(range(5000, 5000 + 3 * BLOCK))
    order, _ = scorer.rank(["plain", "retains"], hash_block_chain(prompt, BLOCK), len(prompt))
    assert order == [1, 0]
    replicas = ["plain", "retains"]
    _, _, _, pressures = scorer.standings(replicas, scorer.follower.figures(replicas))
    assert pressures.tolist() == [0.8, 4 / 6]


def test_working_sets_count_the_distinct_blocks_sent_within_the_window():
    from kvserve.router.working_sets import WorkingSets

    sets = WorkingSets(window_s=10.0)
    conversation = hash_block_chain(list(range(4 * BLOCK)), BLOCK)
    other = hash_block_chain(list(range(100, 100 + BLOCK)), BLOCK)
    sets.add("a", conversation[:2], limit=100, now=0.0)
    sets.add("a", conversation, limit=100, now=1.0)  # the next turn holds the first
    sets.add("a", conversation[:3], limit=100, now=2.0)
    sets.add("a", other, limit=100, now=5.0)
    assert sets.blocks("a", now=5.0) == 4 + 1 and sets.blocks("b", now=5.0) == 0
    assert sets.blocks("a", now=12.5) == 1  # the conversation was last sent at 2.0
    assert sets.blocks("a", now=15.5) == 0
    sets.add("a", conversation, limit=2, now=16.0)
    assert sets.blocks("a", now=16.0) == 2
    sets.forget("a")
    assert sets.blocks("a", now=16.0) == 0


def test_working_sets_match_recent_sends_until_they_expire():
    from kvserve.router.working_sets import WorkingSets

    recent = WorkingSets()
    chain = hash_block_chain(list(range(16)), BLOCK)
    recent.add("a", chain[:3], limit=None, now=0.0)
    recent.add("a", chain[:2], limit=None, now=1.0)
    recent.add("b", chain[:1], limit=None, now=2.0)
    assert recent.recent_matches(chain, ["a", "b", "c"], within_s=5.0, now=2.0) == {"a": 3, "b": 1}
    assert recent.recent_matches(chain, ["a", "b"], within_s=5.0, now=5.5) == {"a": 2, "b": 1}
    assert recent.recent_matches(chain, ["a", "b"], within_s=5.0, now=7.5) == {}


def test_scorer_sends_a_follow_up_after_its_first_request_before_any_event():
    from kvserve.router.kv_scoring import KVScorer

    follower = follower_with({"a": [], "b": [], "c": []})
    scorer = KVScorer(follower, BLOCK)
    first = list(range(20))
    hashes = hash_block_chain(first, BLOCK)
    order, _ = scorer.rank(["a", "b", "c"], hashes, len(first))
    scorer.record(["a", "b", "c"][order[0]], hashes)
    # The first request is answered: a heartbeat comes, but none of its blocks' events yet.
    follower.apply(hub_news(2, {name: news_of([], sent_at=1.0) for name in "abc"}, 1))
    follow_up = first + [99, 98, 97, 96]
    again, reason = scorer.rank(["a", "b", "c"], hash_block_chain(follow_up, BLOCK), len(follow_up))
    assert again[0] == order[0] and reason == "cached_prefix"


HASHES = [bytes([k]) * 32 for k in range(6)]  # a few hashes, so that chains and replicas overlap often
NAMES = ["a", "b", "c"]


def per_replica_walk(index: KVIndex, block_hashes: list[BlockHash], replicas: list[str]) -> dict[str, int]:
    """What `prefix_matches` must give (it leaves out the zeros): each replica's own set, walked until its first miss."""
    matched = {}
    for replica in replicas:
        state = index.replicas.get(replica)
        held = state.blocks if state is not None else set()
        depth = 0
        while depth < len(block_hashes) and block_hashes[depth] in held:
            depth += 1
        matched[replica] = depth
    return matched


hash_lists = st.lists(st.sampled_from(HASHES), max_size=6)
events = st.lists(st.one_of(
    st.builds(lambda hashes: BlockStored(hashes, None, [], BLOCK, None, DEVICE_MEDIUM, DEFAULT_RETENTION_PRIORITY),
              hash_lists),
    st.builds(BlockRemoved, hash_lists),
    st.just(AllBlocksCleared()),
), max_size=4)


class KVIndexMachine(RuleBasedStateMachine):
    """Snapshots, event batches (in order or not), drops and queries in any order: the index's
    sets follow `apply_events`, and its hash -> holders map says the same as those sets."""

    def __init__(self):
        super().__init__()
        self.index = KVIndex()
        self.model: dict[str, set[BlockHash]] = {}  # each replica's blocks, by `apply_events`

    @rule(replica=st.sampled_from(NAMES), blocks=hash_lists, epoch=st.integers(0, 2))
    def load_snapshot(self, replica, blocks, epoch):
        heartbeat = Heartbeat(epoch, 3, 0.0, pool_stats(cached=len(set(blocks))))
        self.index.load_snapshot(replica, BLOCK, BlockSnapshot(epoch, 3, blocks), heartbeat, now=0.0)
        self.model[replica] = set(blocks)

    @rule(replica=st.sampled_from(NAMES), events=events, step=st.sampled_from([1, 1, 1, 0, 2]),
          other_epoch=st.booleans())
    def apply_batch(self, replica, events, step, other_epoch):
        state = self.index.replicas.get(replica)
        epoch, seq = (state.epoch, state.last_seq) if state is not None else (0, 0)
        fate = self.index.apply(replica, KVEventBatch(epoch + other_epoch, seq + step, 0.0, events))
        if state is None:
            assert fate is Fate.GAP
        elif other_epoch:
            assert fate is Fate.FENCED
        else:
            assert fate is {0: Fate.DUPLICATE, 1: Fate.APPLIED, 2: Fate.GAP}[step]
        if fate is Fate.APPLIED:
            apply_events(self.model[replica], events)

    @rule(replica=st.sampled_from(NAMES + ["unknown"]))
    def drop(self, replica):
        self.index.drop_replica(replica)
        self.model.pop(replica, None)

    @rule(block_hashes=st.lists(st.sampled_from(HASHES), max_size=8),
          replicas=st.lists(st.sampled_from(NAMES + ["unknown"]), max_size=5))
    def query(self, block_hashes, replicas):
        matched = self.index.prefix_matches(block_hashes, replicas)
        expected = per_replica_walk(self.index, block_hashes, replicas)
        assert matched == {replica: depth for replica, depth in expected.items() if depth}
        assert expected == leading_matches(block_hashes, replicas, lambda r: self.model.get(r, set()))

    @invariant()
    def sets_follow_the_events(self):
        assert {r: s.blocks for r, s in self.index.replicas.items()} == self.model

    @invariant()
    def holders_say_what_the_sets_say(self):
        expected: dict[BlockHash, set[str]] = {}
        for replica, blocks in self.model.items():
            for block_hash in blocks:
                expected.setdefault(block_hash, set()).add(replica)
        assert {h: self.index.holders_of(h) for h in self.index.holders} == expected
        for held in self.index.holders.values():  # no empty entry, no set standing for one holder
            assert held in self.model if isinstance(held, str) else len(held) >= 2 and held <= self.model.keys()


TestKVIndexMachine = KVIndexMachine.TestCase
TestKVIndexMachine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_prefix_matches_walks_once_for_shared_and_sole_holders():
    index = KVIndex()
    chain = hash_block_chain(list(range(6 * BLOCK)), BLOCK)
    for name, depth in {"a": 6, "b": 4, "c": 1, "d": 4, "e": 0}.items():
        snapshot = BlockSnapshot(1, 0, chain[:depth] + hash_block_chain([1000 + ord(name)] * BLOCK, BLOCK))
        index.load_snapshot(name, BLOCK, snapshot, Heartbeat(1, 0, 0.0, pool_stats(cached=depth + 1)), now=0.0)
    assert index.holders[chain[5]] == "a" and index.holders[chain[2]] == {"a", "b", "d"}
    asked = ["e", "d", "c", "b", "a", "gone"]
    assert index.prefix_matches(chain, asked) == {"d": 4, "c": 1, "b": 4, "a": 6}
    assert index.prefix_matches(chain, ["b", "c"]) == {"b": 4, "c": 1}  # "a" not asked: not counted
    index.apply("a", KVEventBatch(1, 1, 0.0, [BlockRemoved(chain[3:4], DEVICE_MEDIUM)]))
    index.drop_replica("b")
    assert index.holders[chain[3]] == "d" and index.holders[chain[4]] == "a"
    assert index.prefix_matches(chain, asked) == {"d": 4, "c": 1, "a": 3}
    index.apply("a", KVEventBatch(1, 2, 0.0, [AllBlocksCleared(), BlockStored(chain[:1], None, [], BLOCK, None, DEVICE_MEDIUM,
                                                                           DEFAULT_RETENTION_PRIORITY)]))
    assert index.holders[chain[0]] == {"a", "c", "d"} and chain[4] not in index.holders


def test_a_prefix_held_by_the_same_replicas_is_one_holding_and_walked_through_by_identity():
    """Each batch's blocks that go from the same holders to the same holders share one
    frozenset: a chain three replicas took whole is one object from its first block to its
    last, and what one replica evicts in a batch becomes one object again."""
    index = KVIndex()
    chain = hash_block_chain(list(range(8 * BLOCK)), BLOCK)
    for name in "abc":
        heartbeat = Heartbeat(1, 0, 0.0, pool_stats(cached=8))
        index.load_snapshot(name, BLOCK, BlockSnapshot(1, 0, chain), heartbeat, now=0.0)
    assert len({id(index.holders[h]) for h in chain}) == 1 and index.holders[chain[0]] == {"a", "b", "c"}
    index.apply("b", KVEventBatch(1, 1, 0.0, [BlockRemoved(chain[5:], DEVICE_MEDIUM)]))
    index.apply("c", KVEventBatch(1, 1, 0.0, [BlockRemoved(chain[3:], DEVICE_MEDIUM)]))
    holdings = [index.holders[h] for h in chain]
    assert [len({id(h) for h in part}) for part in (holdings[:3], holdings[3:5], holdings[5:])] == [1, 1, 1]
    assert holdings[5] == "a" and holdings[3] == {"a", "b"}
    assert index.prefix_matches(chain, ["a", "b", "c"]) == {"a": 8, "b": 5, "c": 3}
    assert index.prefix_matches(chain, ["b", "c"]) == {"b": 5, "c": 3}


def sent_since(sets, replica: str, since: float) -> set[BlockHash]:
    """The blocks `sets` still counts for `replica`, last sent after `since` (read inside)."""
    sent_at = {send.number: send.at for send in sets._sends.get(replica, ())}
    return {h for h, number in sets._last_send.get(replica, {}).items() if sent_at[number] > since}


def test_recent_matches_equal_a_walk_of_each_replicas_sends():
    """The binary search of `recent_matches` against a block-by-block walk, after prompts
    that share prefixes went to replicas at various times and pushed each other out; and
    only the replicas it takes deeper than a given depth, where one is given."""
    import random

    from kvserve.router.working_sets import WorkingSets

    rng = random.Random(7)
    trunks = [hash_block_chain(list(range(100 * t, 100 * t + 12 * BLOCK)), BLOCK) for t in range(3)]
    sets = WorkingSets(window_s=50.0)
    for now in range(40):
        chain = rng.choice(trunks)[: rng.randrange(1, 13)]
        sets.add(rng.choice(NAMES), chain, limit=rng.choice([None, 20]), now=float(now))
        query = rng.choice(trunks)
        since = now - rng.choice([3.0, 10.0])
        walked = leading_matches(query, NAMES, lambda r: sent_since(sets, r, since))
        recent = {r: depth for r, depth in walked.items() if depth}
        assert sets.recent_matches(query, NAMES, within_s=now - since, now=float(now)) == recent
        beyond = {r: rng.randrange(13) for r in NAMES if rng.random() < 0.5}  # what the index matched
        deeper = {r: depth for r, depth in recent.items() if depth > beyond.get(r, 0)}
        assert sets.recent_matches(query, NAMES, within_s=now - since, beyond=beyond, now=float(now)) == deeper


def test_working_set_sizes_equal_the_distinct_blocks_sent_within_the_window():
    """As sends expire (each forgetting only the blocks no later send re-sent), every
    replica's size is the plain count of the distinct blocks sent there within the window."""
    import random

    from kvserve.router.working_sets import WorkingSets

    rng = random.Random(11)
    trunks = [hash_block_chain(list(range(100 * t, 100 * t + 12 * BLOCK)), BLOCK) for t in range(3)]
    sets = WorkingSets(window_s=6.0)
    sent = []
    for now in range(60):
        chain = rng.choice(trunks)[: rng.randrange(1, 13)]
        replica = rng.choice(NAMES)
        sets.add(replica, chain, limit=None, now=float(now))
        sent.append((now, replica, chain))
        for name in NAMES:
            plain = {h for at, r, c in sent if r == name and at > now - 6.0 for h in c}
            assert sets.blocks(name, now=float(now)) == len(plain)


def test_a_withdrawn_send_leaves_the_working_sets_as_if_never_sent():
    """Sends withdrawn (the replica refused them) at random among sends that share prefixes:
    each replica's size, its recent matches, and its sizes as the rest expire are those of
    the sends that were not withdrawn."""
    import random

    from kvserve.router.working_sets import WorkingSets

    rng = random.Random(5)
    trunks = [hash_block_chain(list(range(100 * t, 100 * t + 12 * BLOCK)), BLOCK) for t in range(3)]
    sets = WorkingSets(window_s=8.0)
    sent = []  # (at, replica, chain) of the sends not withdrawn
    for now in range(80):
        chain = rng.choice(trunks)[: rng.randrange(1, 13)]
        replica = rng.choice(NAMES)
        sets.add(replica, chain, limit=None, now=float(now))
        sent.append((now, replica, chain))
        if rng.random() < 0.4:
            _, replica, chain = rng.choice([send for send in sent if send[0] > now - 8.0])
            sets.withdraw(replica, chain)
            sent.remove(next(send for send in reversed(sent) if send[1:] == (replica, chain)))
        for name in NAMES:
            plain = {h for at, r, c in sent if r == name and at > now - 8.0 for h in c}
            assert sets.blocks(name, now=float(now)) == len(plain)
        query, since = rng.choice(trunks), now - 3.0
        walked = leading_matches(query, NAMES, lambda r: {h for at, name, c in sent if name == r and at > since for h in c})
        assert sets.recent_matches(query, NAMES, within_s=3.0, now=float(now)) == {r: d for r, d in walked.items() if d}
    sets.withdraw("a", trunks[0] + trunks[1])  # never sent: nothing changes
    assert [sets.blocks(name, now=79.0) for name in NAMES] == [
        len({h for at, r, c in sent if r == name and at > 71.0 for h in c}) for name in NAMES]


def test_a_refused_request_does_not_draw_its_retry_back_to_the_replica_that_refused_it():
    """Nor does the retry count as the refused prompt's next turn."""
    from kvserve.router.kv_scoring import KVScorer

    follower = follower_with({"a": [], "b": []})
    scorer = KVScorer(follower, BLOCK)
    prompt = list(range(40))
    hashes = hash_block_chain(prompt, BLOCK)
    order, _ = scorer.rank(["a", "b"], hashes, len(prompt))
    refused_by = ["a", "b"][order[0]]
    scorer.record(refused_by, hashes)
    assert scorer.rank(["a", "b"], hashes, len(prompt))[1] != "no_cached_prefix"  # taken for cached there
    assert scorer.conversations.continues(hashes)  # and for a conversation's next turn
    scorer.withdraw(refused_by, hashes)
    assert scorer.rank(["a", "b"], hashes, len(prompt))[1] == "no_cached_prefix"
    assert scorer.working_sets.blocks(refused_by) == 0
    assert not scorer.conversations.continues(hashes)  # the retry starts the conversation


def test_index_follows_the_host_tier_too():
    """Blocks evicted to a replica's host-memory tier leave its device set and join its host
    set in the index, as they do in the engine."""
    kv = KVCacheManager(4, BLOCK, True, 8)
    index = KVIndex()
    start_following(index, "a", kv)
    kv.free(run_prompt(kv, "x", list(range(13))))
    kv.free(run_prompt(kv, "y", list(range(100, 113))))  # takes the device blocks: x's go to host
    assert index.apply("a", kv.take_events()) is Fate.APPLIED
    state = index.replicas["a"]
    assert state.blocks == set(kv.cached_block_hashes())
    assert state.host_blocks == set(kv.host.cached) and state.host_blocks
    x_chain = hash_block_chain(list(range(13)), BLOCK)
    assert index.prefix_matches(x_chain, ["a"]) == {}
    assert index.host_extensions(x_chain, ["a"], {}) == {"a": 3}


def test_scorer_credits_a_host_tier_copy_between_a_device_hit_and_a_miss():
    from kvserve.router.kv_scoring import KVScorer

    prompt = list(range(40))
    follower = follower_with({"device": prompt[:32], "host": [], "miss": []})
    hashes = hash_block_chain(prompt, BLOCK)
    follower.index.replicas["host"].host_blocks.update(hashes[:8])
    follower.index.with_host_blocks.add("host")
    scorer = KVScorer(follower, BLOCK, RouterOptions(load_cost_tokens=0))
    order, _ = scorer.rank(["miss", "host", "device"], hashes, len(prompt))
    assert order == [2, 1, 0]
    free = KVScorer(follower, BLOCK, RouterOptions(load_cost_tokens=0, host_block_credit=1.0))
    follower.index.replicas["host"].host_blocks.update(hashes[8:])
    assert free.rank(["miss", "host", "device"], hashes, len(prompt))[0][0] == 1  # all ten blocks, at full credit


def test_scorer_order_sorts_by_cost_then_breaks_ties_as_one_full_sort_would():
    """`KVScorer._order` sorts only the tied replicas by the tie-breaking keys; the result is
    the full sort by (cost, waiting ahead, load, fill, random draw)."""
    from kvserve.router.kv_scoring import KVScorer

    scorer = KVScorer(follower_with({}), BLOCK)
    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.integers(1, 40))
        costs, ahead, loads = rng.integers(0, 5, n).astype(float), rng.integers(0, 2, n), rng.integers(0, 3, n)
        fills = rng.integers(0, 2, n) / 2
        scorer._ties = np.random.default_rng(trial)
        draws = np.random.default_rng(trial).random(n)
        expected = np.lexsort((draws, fills, loads, ahead, costs))
        assert scorer._order(costs, ahead, loads, fills).tolist() == expected.tolist()


def test_a_follower_without_ray_stops_rather_than_start_a_cluster():
    """Ray's calls start a local cluster when none is up: a follower outliving `ray.shutdown()`
    (in a driver that held a handle of its own) must stop, not start one."""
    import asyncio

    import ray

    async def follow() -> None:
        follower = KVIndexFollower("no-such-app", 16)
        follower.ensure_running()
        await asyncio.wait_for(follower._tasks[0], 5)

    assert not ray.is_initialized()
    asyncio.run(follow())
    assert not ray.is_initialized()
