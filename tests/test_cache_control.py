"""Cache control: retention priorities in the block pool and the engine, and the host tier
(copies exact, a conversation's history served from host memory)."""

import random

import pytest
from pydantic import ValidationError

from kvserve.router.openai_schema import CompletionRequest, validation_problem
from kvserve.workers.engine.block_pool import BlockPool
from kvserve.workers.engine.config import EngineConfig, PrefixRetention
from kvserve.workers.engine.retention import KVRetention, RetentionAsk, RetentionRange
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.runner import start_engine

BLOCK = 16
SYSTEM = 256


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def cached_pool(asks: list[RetentionAsk | None], clock=None) -> tuple[BlockPool, list]:
    """A pool whose blocks 0..n-1 are cached with `asks` and freed in that order."""
    pool = BlockPool(len(asks), 4, clock=clock or Clock())
    blocks = pool.take(len(asks))
    pool.cache(blocks, [bytes([i]) * 32 for i in range(len(asks))], None, list(range(4 * len(asks))), asks)
    pool.release(blocks)
    return pool, blocks


def evicted_order(pool: BlockPool) -> list[int]:
    return [pool.take(1)[0].block_id for _ in range(pool.num_blocks)]


def test_eviction_takes_the_lowest_priority_first_and_lru_within_one():
    high, low = RetentionAsk(90, None), RetentionAsk(10, None)
    pool, _ = cached_pool([high, None, low, None, low, high])
    assert evicted_order(pool) == [2, 4, 1, 3, 0, 5]


def test_a_priority_falls_back_to_the_default_after_its_duration():
    clock = Clock()
    pool, _ = cached_pool([RetentionAsk(90, 10.0), None, RetentionAsk(60, None)], clock)
    clock.now = 11.0
    assert evicted_order(pool) == [0, 1, 2]  # block 0, now at 35, was freed before block 1


def test_a_shared_block_keeps_the_highest_priority_asked():
    pool, blocks = cached_pool([None, None])
    pool.touch(blocks)
    pool.ask(blocks[:1], [RetentionAsk(100, None)])
    pool.ask(blocks[:1], [RetentionAsk(5, None)])
    pool.release(blocks)
    assert blocks[0].retention.priority == 100
    assert evicted_order(pool) == [1, 0]


def test_a_long_mix_of_frees_hits_and_evictions_follows_priority_then_free_order():
    """Against the rule itself: the free cached block to go next is the one of lowest priority
    (its ask's, or the default once the ask expired), freed longest ago within a priority.
    Enough hits at a high priority that the queue drops its stale entries along the way."""
    rng, clock = random.Random(0), Clock()

    def ask():
        return rng.choice([None, None, RetentionAsk(10, None), RetentionAsk(90, None),
                           RetentionAsk(60, clock.now + rng.uniform(0.5, 3))])
    pool, blocks = cached_pool([ask() for _ in range(48)], clock)
    freed_at = {b.block_id: k for k, b in enumerate(blocks)}
    held = []
    for tick in range(48, 3000):
        clock.now = tick / 100
        if held and rng.random() < 0.5:
            block = held.pop(rng.randrange(len(held)))
            pool.release([block])
            freed_at[block.block_id] = tick
        elif rng.random() < 0.7:
            block = rng.choice(blocks)
            if block.ref_count == 0:  # a prefix hit on a free block
                pool.touch([block])
                held.append(block)
        elif pool.num_free:
            free = [b for b in blocks if b.ref_count == 0]

            def rank(b):
                ask = b.retention
                live = ask is not None and (ask.expires_at is None or ask.expires_at > clock.now)
                return (ask.priority if live else 35, freed_at[b.block_id])
            expected = min(free, key=rank)
            taken = pool.take(1)[0]
            assert taken is expected
            pool.cache([taken], [tick.to_bytes(4, "big") * 8], None, [0] * 4, [ask()])
            held.append(taken)


def test_block_asks_take_the_highest_priority_of_their_tokens():
    retention = KVRetention((RetentionRange(0, 20, 100), RetentionRange(20, None, 0, 5.0)), decode_priority=60)
    asks = retention.block_asks(0, 4, BLOCK, num_prompt_tokens=48, now=0.0)
    assert [a.priority for a in asks] == [100, 100, 0, 60]
    assert asks[2].expires_at == 5.0
    with pytest.raises(ValueError, match="between 0 and 100"):
        RetentionRange(0, None, 101)


def make_engine(tiny_checkpoints, **options):
    config = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", block_size=BLOCK, max_model_len=320,
                          max_num_batched_tokens=512, **options)
    return start_engine(config)


def run(engine, request_id: str, prompt: list[int], max_tokens: int = 8, **options) -> tuple[list[int], int]:
    """Greedy output tokens and cached prompt tokens of one request, run alone."""
    engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       **options)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                last = output
    return last.outputs[0].token_ids, last.num_cached_tokens


def flood(engine, rng: random.Random, count: int) -> None:
    for i in range(count):
        run(engine, f"flood-{i}", [rng.randrange(1, 500) for _ in range(64)], max_tokens=1)


@pytest.mark.parametrize("how", ["request", "deployment", "none"])
def test_a_max_priority_system_prompt_survives_a_flood(tiny_checkpoints, how):
    rng = random.Random(0)
    system = [rng.randrange(1, 500) for _ in range(SYSTEM)]
    prefixes = [PrefixRetention(prefix_token_ids=system, priority=100)] if how == "deployment" else []
    engine = make_engine(tiny_checkpoints, num_kv_blocks=40, kv_retention_prefixes=prefixes)
    asked = {"kv_retention": KVRetention((RetentionRange(0, SYSTEM, 100),))} if how == "request" else {}
    run(engine, "first", system + [7, 8, 9], **asked)
    flood(engine, rng, 20)
    _, cached = run(engine, "again", system + [10, 11, 12], **asked)
    assert cached == (0 if how == "none" else SYSTEM)


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_offload_keeps_greedy_outputs_and_serves_history_from_host(tiny_checkpoints, async_scheduling):
    rng = random.Random(1)
    plain = make_engine(tiny_checkpoints, num_kv_blocks=400)
    tiered = make_engine(tiny_checkpoints, num_kv_blocks=24, kv_offload_gib=0.05, async_scheduling=async_scheduling)
    assert tiered.kv.host is not None
    turn = [rng.randrange(1, 500) for _ in range(100)]
    first = run(plain, "t1", turn)[0]
    assert run(tiered, "t1", turn)[0] == first
    flood(tiered, rng, 8)
    assert tiered.kv.num_host_cached_blocks > 0
    second_turn = turn + first + [rng.randrange(1, 500) for _ in range(30)]
    expected, _ = run(plain, "t2", second_turn)
    tokens, cached = run(tiered, "t2", second_turn)
    assert cached >= len(turn) // BLOCK * BLOCK
    assert tiered.kv.num_host_hit_blocks > 0
    assert tokens == expected
    tier = tiered.stats().host_tier  # what /metrics exports per replica
    assert tier.hit_blocks == tiered.kv.num_host_hit_blocks and tier.blocks_cached > 0
    assert tier.blocks_in >= tier.hit_blocks and tier.blocks_out >= tier.blocks_cached
    assert tier.bytes_in == tier.blocks_in * tier.bytes_out // tier.blocks_out > 0
    assert plain.stats().host_tier is None


@pytest.mark.parametrize("retention, message", [
    ({"ranges": [{"start": 8, "end": 4, "priority": 100}]}, "kv_retention range end (4) must be past its start (8)"),
    ({"ranges": [{"priority": 101}]}, "kv_retention.ranges[0].priority must be <= 100"),
    ({"decode_priority": -1}, "kv_retention.decode_priority must be >= 0"),
    ({"ranges": [{"priority": 1, "duration": 5}]}, "kv_retention.ranges[0].duration is not a known parameter"),
])
def test_bad_kv_retention_is_refused_naming_the_field(retention, message):
    with pytest.raises(ValidationError) as refused:
        CompletionRequest(prompt="hi", kv_retention=retention)
    assert validation_problem(refused.value.errors()[0])[0] == message


def test_kv_retention_reaches_the_engine_as_asked():
    body = CompletionRequest(prompt="hi", kv_retention={"ranges": [{"end": 64, "priority": 100, "duration_s": 60}]})
    assert body.retention() == KVRetention((RetentionRange(0, 64, 100, 60.0),))


def test_host_tier_figures_reach_the_metrics():
    from prometheus_client import generate_latest

    from kvserve.router import routing_metrics
    from kvserve.workers.protocol import EngineStats, HostTierStats

    tier = HostTierStats(blocks_total=32, blocks_cached=7, hit_blocks=4, blocks_in=4, blocks_out=9, bytes_in=4096,
                         bytes_out=9216)
    stats = EngineStats(running=1, waiting=0, kv_blocks_total=16, kv_blocks_used=3, kv_blocks_cached=5,
                        num_preemptions=0, grammars=None, speculative=None, host_tier=tier, waiting_by_priority=(),
                        lora_adapters=(), queued_tokens=0, step_cost=None, working_set_blocks=0)
    routing_metrics.export_replica_stats({"r1": stats}, {}, 0)
    text = generate_latest().decode()
    for name, value in [("hit_blocks_total", 4), ("blocks_out_total", 9), ("bytes_in_total", 4096)]:
        assert f'kvserve_host_kv_{name}{{replica="r1"}} {float(value)}' in text


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_the_engine_reports_its_queue_per_priority_where_it_orders_by_priority(tiny_checkpoints, policy):
    engine = make_engine(tiny_checkpoints, scheduling_policy=policy)
    for request_id, priority in [("a", 10), ("b", 0), ("c", 0)]:
        engine.add_request(request_id, list(range(1, 40)), SamplingParams(max_tokens=1), priority=priority)
    stats = engine.stats()
    assert stats.waiting == 3
    assert stats.waiting_by_priority == (((0, 2), (10, 1)) if policy == "priority" else ())
