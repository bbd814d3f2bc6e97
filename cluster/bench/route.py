"""`kvserve bench route`: the KV-aware routing decision's own time, in process.

Each replica's index holds the chains of several long prompts; every query is a prompt of
`--prompt-tokens` tokens sharing a random-length prefix with one of them, so the scan goes deep
into the chains and most replicas drop out at different depths.

With `--churn-batches N` it then applies N event batches to the index, the replicas in turn,
each batch evicting a replica's `--churn-blocks` oldest blocks and storing as many new ones, as
a full cache does under traffic, and times each: the follower applies them on the router's
event loop, so a slow one delays the decisions waiting behind it.

With `--hub-answers N` every replica then publishes such a batch and a heartbeat to a KV
event hub (the real one, in process) N times, the hub answering the follower after each
round (a busy cluster between two polls); the follower folds the answers in alternately at
once and in slices (`KVIndexFollower.apply_in_slices`, as it does when it follows a hub). It
reports the hub's time per publish and per answer, and how long each answer held the event
loop at a stretch: the longest a routing decision could wait behind it.
"""

import argparse
import asyncio
import dataclasses
import os
import random
import time
from collections import deque

from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.kv_index import Fate
from kvserve.router.kv_scoring import KVScorer
from kvserve.router.options import RouterOptions
from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.engine.kv_events import DEVICE_MEDIUM, BlockRemoved, BlockStored
from kvserve.workers.kv_event_hub import KVEventHub
from kvserve.workers.protocol import (
    DEFAULT_RETENTION_PRIORITY, BlockSnapshot, EngineStats, Heartbeat, HubNews, KVEventBatch, ReplicaNews,
    ReplicaRegistration, StepCost,
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--prompts-per-replica", type=int, default=8)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--cost-unit", choices=["tokens", "seconds"], default=RouterOptions().cost_unit,
                        help="the kv router's cost (router_options.cost_unit); with seconds every replica reports "
                        "a step cost and a queue")
    parser.add_argument("--churn-batches", type=int, default=0,
                        help="then apply this many event batches to the index and time each (default: none)")
    parser.add_argument("--churn-blocks", type=int, default=8, help="blocks each churn batch evicts and stores")
    parser.add_argument("--hub-answers", type=int, default=0,
                        help="then this many rounds of every replica publishing a heartbeat and a churn batch to a "
                        "hub in process, which answers the follower: times the hub, and how long each answer holds "
                        "the follower's event loop (default: none)")


def main(args: argparse.Namespace) -> int:
    rng = random.Random(0)
    size = args.block_size
    prompts = [[rng.randrange(32000) for _ in range(args.prompt_tokens)]
               for _ in range(args.replicas * args.prompts_per_replica)]
    chains = [hash_block_chain(p, size) for p in prompts]
    follower = KVIndexFollower("bench-route", size, clock=lambda: 0.0)  # no replica ever falls silent
    replicas = [f"replica-{i}" for i in range(args.replicas)]
    news = {}
    for i, name in enumerate(replicas):
        held = [h for chain in chains[i :: args.replicas] for h in chain]
        stats = EngineStats(running=rng.randrange(8), waiting=0, kv_blocks_total=1 << 20, kv_blocks_used=len(held),
                            kv_blocks_cached=len(held), num_preemptions=0, grammars=None, speculative=None,
                            host_tier=None, waiting_by_priority=(), lora_adapters=(),
                            queued_tokens=rng.randrange(4096), step_cost=_step_cost(rng),
                            working_set_blocks=len(held))
        heartbeat = Heartbeat(epoch=i, seq=1, sent_at=0.0, stats=stats)
        news[name] = ReplicaNews(size, hash_check_value(size), heartbeat, None, BlockSnapshot(i, 1, held))
    follower.apply(HubNews(1, news, 1, frozenset(news)))
    scorer = KVScorer(follower, size, RouterOptions(cost_unit=args.cost_unit))
    queries = []
    for _ in range(64):
        base = rng.choice(prompts)
        keep = rng.randrange(len(base))
        tokens = base[:keep] + [rng.randrange(32000) for _ in range(len(base) - keep)]
        queries.append((hash_block_chain(tokens, size), len(tokens)))
    times = []
    for k in range(args.decisions):
        hashes, num_tokens = queries[k % len(queries)]
        start = time.perf_counter()
        order, _ = scorer.rank(replicas, hashes, num_tokens)
        scorer.record(replicas[order[0]], hashes)  # as the router does, within its decision
        times.append(time.perf_counter() - start)
    pick = _milliseconds_at(times)
    print(f"routing decision, {args.replicas} replicas, {args.prompt_tokens}-token prompts "
          f"({sum(len(r.blocks) for r in follower.index.replicas.values())} blocks indexed): p50 {pick(0.5):.3f} ms, p90 {pick(0.9):.3f} ms, "
          f"p99 {pick(0.99):.3f} ms")
    churn = _Churn(follower, {name: news[name].snapshot.blocks for name in replicas}, args.churn_blocks, size)
    if args.churn_batches:
        _time_batches(follower, churn, args.churn_batches)
    if args.hub_answers:
        asyncio.run(_time_hub_answers(follower, news, churn, args.hub_answers))
    return 0


class _Churn:
    """Event batches as a full cache makes them: each evicts a replica's oldest blocks and
    stores as many new ones."""

    def __init__(self, follower: KVIndexFollower, held: dict[str, list[bytes]], count: int, block_size: int):
        self.index, self.count, self.block_size = follower.index, count, block_size
        self.oldest_first = {name: deque(blocks) for name, blocks in held.items()}
        self.seqs = {name: self.index.replicas[name].last_seq for name in held}

    def batch(self, name: str) -> KVEventBatch:
        """The next batch of replica `name`."""
        blocks = self.oldest_first[name]
        evicted = [blocks.popleft() for _ in range(min(self.count, len(blocks)))]
        stored = [os.urandom(32) for _ in range(self.count)]  # as a block hash: 32 uniform bytes
        blocks.extend(stored)
        self.seqs[name] += 1
        return KVEventBatch(self.index.replicas[name].epoch, self.seqs[name], 0.0, [
            BlockRemoved(evicted, DEVICE_MEDIUM),
            BlockStored(stored, None, [], self.block_size, None, DEVICE_MEDIUM, DEFAULT_RETENTION_PRIORITY)])


def _time_batches(follower: KVIndexFollower, churn: _Churn, count: int) -> None:
    """Apply `count` batches, the replicas in turn; print the apply times."""
    names = list(churn.seqs)
    times = []
    for k in range(count):
        name = names[k % len(names)]
        batch = churn.batch(name)
        start = time.perf_counter()
        fate = follower.index.apply(name, batch)
        times.append(time.perf_counter() - start)
        if fate is not Fate.APPLIED:  # its time would be of a batch turned away
            raise RuntimeError(f"churn batch {batch.seq} of {name}: {fate.value}")
    pick = _milliseconds_at(times)
    print(f"event batches ({churn.count} blocks evicted and {churn.count} stored each, {len(times)} batches): "
          f"p50 {pick(0.5):.3f} ms, p99 {pick(0.99):.3f} ms, p99.9 {pick(0.999):.3f} ms, worst {pick(1.0):.1f} ms")


async def _time_hub_answers(follower: KVIndexFollower, news: dict[str, ReplicaNews], churn: _Churn,
                            count: int) -> None:
    """`count` rounds: every replica publishes a batch and a heartbeat to a hub (the real one,
    in process), which answers the follower; the answers are folded in alternately at once
    and in slices. Print the hub's times and how long each answer held the event loop."""
    hub = KVEventHub()
    for name, replica_news in news.items():  # where the follower stands (after any churn batches)
        state = follower.index.replicas[name]
        snapshot = BlockSnapshot(state.epoch, state.last_seq, list(state.blocks))
        heartbeat = dataclasses.replace(replica_news.heartbeat, seq=state.last_seq)
        await hub.register(ReplicaRegistration(name, replica_news.block_size, replica_news.hash_check, _Alive(),
                                               snapshot, heartbeat))
    publishes, answers, held = [], [], {"at once": [], "in slices": []}
    for k in range(count):
        for name, replica_news in news.items():
            batch = churn.batch(name)
            heartbeat = dataclasses.replace(replica_news.heartbeat, seq=batch.seq, sent_at=float(k + 1))
            start = time.perf_counter()
            if not hub.publish(name, [batch], heartbeat):
                raise RuntimeError(f"the hub turned away batch {batch.seq} of {name}")
            publishes.append(time.perf_counter() - start)
        start = time.perf_counter()
        answer = await hub.follow(follower.follower_id, follower.cursors(), -1, 0)
        answers.append(time.perf_counter() - start)
        folding = follower.apply_in_slices(answer) if k % 2 else _at_once(follower, answer)
        held["in slices" if k % 2 else "at once"].append(await _longest_hold(folding))
        lost = [name for name in news if name not in follower.index.replicas]
        if lost:
            raise RuntimeError(f"hub answer {k + 1}: replicas dropped from the index: {lost[:3]}")
    quiet = []  # answers when nothing happened since the last: the replicas only named
    for _ in range(5):
        start = time.perf_counter()
        await hub.follow(follower.follower_id, follower.cursors(), -1, 0)
        quiet.append(time.perf_counter() - start)
    folds = ", ".join(f"{how} p50 {_milliseconds_at(times)(0.5):.2f} ms, worst {max(times) * 1e3:.2f} ms"
                      for how, times in held.items() if times)
    print(f"hub answers ({len(news)} replicas, each a heartbeat and a batch of {churn.count} blocks evicted and "
          f"{churn.count} stored; {count} answers): a publish p50 {_milliseconds_at(publishes)(0.5) * 1e3:.1f} us, "
          f"an answer built in p50 {_milliseconds_at(answers)(0.5):.2f} ms (with nothing new "
          f"{_milliseconds_at(quiet)(0.5):.2f} ms); the follower held the event loop at "
          f"most {folds}")


class _Alive:
    """Answers the hub's liveness pings, as a live replica's actor does."""

    class __ray_ready__:  # noqa: N801 (the name of the Ray actor method the hub calls)
        @staticmethod
        async def remote() -> None:
            return None


async def _at_once(follower: KVIndexFollower, news: HubNews) -> None:
    follower.apply(news)


async def _longest_hold(folding) -> float:
    """Run coroutine `folding` beside a task that only hands the loop back, and return the
    longest the task waited for its turn."""
    waits, done = [], False

    async def neighbour():
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            waits.append(now - last)
            last = now

    task = asyncio.create_task(neighbour())
    await asyncio.sleep(0)
    await folding
    done = True
    await task
    return max(waits)


def _milliseconds_at(times: list[float]):
    """The quantile q of `times` (seconds), in ms, as a function of q."""
    times = sorted(times)
    return lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3


def _step_cost(rng: random.Random) -> StepCost:
    """A replica's measured steps, as an H100 serving an 8B model might report them."""
    return StepCost(rng.uniform(0.008, 0.012), rng.uniform(5e-5, 8e-5), rng.uniform(5e-5, 1e-4), tokens_per_step=2048)
