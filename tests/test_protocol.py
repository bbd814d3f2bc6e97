"""The messages of workers/protocol.py cross Ray as they are: through an actor call and a
Serve handle each comes back equal to what was sent, and none can be built with a field left
out."""

import dataclasses

import pytest
import ray
from ray import serve

from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.protocol import (
    AllBlocksCleared, BlockRemoved, BlockSnapshot, BlockStored, EmbedRequest, EmbeddingOutput, EngineStats,
    GenerateRequest, GrammarTimings, HostTierStats, Heartbeat, HubNews, KVCursor, KVEventBatch, KVRetention, OutputDelta,
    ReplicaNews, ReplicaRegistration, RequestRefused, RetentionRange, SampleDelta, SamplingParams, SpeculativeStats,
    StepCost, TokenLogprobs,
)

BLOCK = 4
CHAIN = hash_block_chain(list(range(12)), BLOCK, cache_salt="tenant")
STATS = EngineStats(running=2, waiting=1, kv_blocks_total=64, kv_blocks_used=9, kv_blocks_cached=5,
                    num_preemptions=0, grammars=GrammarTimings(compiled=1, compile_s=0.02, masked_steps=3, mask_s=0.001),
                    speculative=SpeculativeStats(proposed=8, accepted=5, verifications=3, proposed_at=(3, 3, 2),
                                                 accepted_at=(3, 1, 1)),
                    host_tier=HostTierStats(blocks_total=32, blocks_cached=7, hit_blocks=4, blocks_in=4, blocks_out=9,
                                            bytes_in=4096, bytes_out=9216),
                    waiting_by_priority=((-1, 1),), lora_adapters=("tuned",), queued_tokens=130,
                    step_cost=StepCost(base_s=0.012, per_prefill_token_s=2e-5, per_decode_seq_s=1e-4, tokens_per_step=2048),
                    working_set_blocks=12)
EPOCH = 2**62 + 5
BATCH = KVEventBatch(EPOCH, 7, 1.7e9, [
    BlockStored(CHAIN[1:], CHAIN[0], list(range(4, 12)), BLOCK, lora_name=None, medium="cpu", priority=100),
    BlockRemoved(CHAIN[:1], medium="cpu"),
    AllBlocksCleared(),
])
HEARTBEAT = Heartbeat(EPOCH, 7, 1.7e9 + 0.25, STATS)
SNAPSHOT = BlockSnapshot(EPOCH, 7, CHAIN)


def messages() -> list:
    """One of each message, every field set to something other than a default."""
    sampling = SamplingParams(n=2, temperature=0.5, top_k=5, max_tokens=9, stop=["\n"], seed=3, logprobs=1)
    sample = SampleDelta(index=1, text="hi", token_ids=[5, 6],
                         logprobs=[TokenLogprobs(5, -0.5, [(5, -0.5)]), TokenLogprobs(6, -1.0, [(7, -0.2)])],
                         finish_reason="stop", stop_reason="\n")
    return [
        GenerateRequest(request_id="cmpl-1-0", prompt_token_ids=list(range(13)), sampling=sampling,
                        prompt="text", block_hashes=CHAIN, hash_check=hash_check_value(BLOCK),
                        cache_salt="tenant", priority=-1,
                        kv_retention=KVRetention((RetentionRange(0, None, 100, 60.0),), decode_priority=10),
                        lora_name="tuned", lora_path="/adapters/tuned"),
        OutputDelta(replica="r1", num_prompt_tokens=13, num_cached_tokens=8, samples=[sample], finished=True,
                    prompt_logprobs=[None, TokenLogprobs(5, -1.5, [(5, -1.5), (7, -2.0)], 1)]),
        EmbedRequest(request_id="embd-1-0", prompt_token_ids=list(range(13)), prompt="text", block_hashes=CHAIN,
                     hash_check=hash_check_value(BLOCK), cache_salt="tenant", priority=2),
        EmbeddingOutput(request_id="embd-1-0", embedding=[0.5, -0.25], num_prompt_tokens=13, num_cached_tokens=8),
        RequestRefused("the request needs up to 90 KV blocks but the pool has only 64", overloaded=False, replica="r1"),
        STATS,
        BATCH,
        SNAPSHOT,
        HEARTBEAT,
        KVCursor(EPOCH, 6, 1234.5),
        HubNews(3, {
            "r1": ReplicaNews(BLOCK, hash_check_value(BLOCK), HEARTBEAT, [BATCH], None),
            "r2": ReplicaNews(BLOCK, hash_check_value(BLOCK), HEARTBEAT, None, SNAPSHOT),
        }, 2, frozenset({"r1", "r2", "r3"})),
        ReplicaRegistration("r1", BLOCK, hash_check_value(BLOCK), "actor-handle", SNAPSHOT, HEARTBEAT),
    ]


@pytest.fixture(scope="module")
def echoes(ray_of):
    """An actor and a Serve deployment that return what they get."""

    class Echo:  # defined here so that Ray pickles it by value: the tests folder is no package
        def echo(self, message):
            return message

    with ray_of(2):
        actor = ray.remote(Echo).remote()
        handle = serve.run(serve.deployment(Echo, ray_actor_options={"num_cpus": 0}).bind(), name="echo",
                           route_prefix=None)
        yield actor, handle


@pytest.mark.parametrize("index", range(len(messages())), ids=[type(m).__name__ for m in messages()])
def test_each_message_crosses_an_actor_call_and_a_serve_handle_unchanged(echoes, index):
    actor, handle = echoes
    sent = messages()[index]
    assert ray.get(actor.echo.remote(sent)) == sent
    assert handle.echo.remote(sent).result(timeout_s=60) == sent


@pytest.mark.parametrize("index", range(len(messages())), ids=[type(m).__name__ for m in messages()])
def test_no_message_can_leave_a_field_out(index):
    message = messages()[index]
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    for name in fields:
        with pytest.raises(TypeError, match=name):
            type(message)(**{k: v for k, v in fields.items() if k != name})


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        STATS.running = 0


def test_a_heartbeat_counts_the_waiting_queue_in_a_few_priority_pairs():
    from kvserve.workers.engine.outputs import WAITING_PRIORITY_PAIRS, count_priorities

    assert count_priorities([5, 0, 5, -2]) == ((-2, 1), (0, 1), (5, 2))
    many = count_priorities(range(2 * WAITING_PRIORITY_PAIRS))
    assert len(many) == WAITING_PRIORITY_PAIRS and sum(n for _, n in many) == 2 * WAITING_PRIORITY_PAIRS
    stats = dataclasses.replace(STATS, waiting_by_priority=many)
    last = WAITING_PRIORITY_PAIRS - 1
    assert stats.waiting_ahead_of(last - 1) == last  # exact up to the last pair
    assert stats.waiting_ahead_of(last) == 2 * WAITING_PRIORITY_PAIRS  # those folded into it count from its priority


def test_two_routers_following_one_hub_through_ray_each_learn_they_are_two(echoes):
    """The routers of two ingress replicas poll the application's hub actor with their own ids;
    each answer tells them how many do (what makes `cost_jitter` apply)."""
    import asyncio

    from kvserve.router.kv_follower import KVIndexFollower
    from kvserve.workers.kv_event_hub import KVEventHub, hub_name

    app = "follower-count"
    hub = ray.remote(KVEventHub).options(name=hub_name(app), namespace="kvserve", num_cpus=0,
                                         max_concurrency=100).remote()

    async def follow_both() -> list[int]:
        routers = [KVIndexFollower(app, BLOCK), KVIndexFollower(app, BLOCK)]
        for router in routers:
            router.ensure_running()
        for _ in range(100):  # each long poll waits up to FOLLOW_TIMEOUT_S (2 s) for news
            if all(r.routers == 2 for r in routers):
                break
            await asyncio.sleep(0.1)
        return [r.routers for r in routers]  # asyncio.run cancels their polls on the way out

    try:
        assert asyncio.run(follow_both()) == [2, 2]
    finally:
        ray.kill(hub)
