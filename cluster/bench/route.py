"""`kvserve bench route`: the KV-aware routing decision's own time, in process.

Each replica's index holds the chains of several long prompts; every query is a prompt of
`--prompt-tokens` tokens sharing a random-length prefix with one of them, so the scan goes deep
into the chains and most replicas drop out at different depths.

With `--churn-batches N` it then applies N event batches to the index, the replicas in turn,
each batch evicting a replica's `--churn-blocks` oldest blocks and storing as many new ones, as
a full cache does under traffic, and times each: the follower applies them on the router's
event loop, so a slow one delays the decisions waiting behind it.
"""

import argparse
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
from kvserve.workers.protocol import (
    DEFAULT_RETENTION_PRIORITY, BlockSnapshot, EngineStats, Heartbeat, HubNews, KVEventBatch, ReplicaNews, StepCost,
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
                            queued_tokens=rng.randrange(4096), step_cost=_step_cost(rng))
        heartbeat = Heartbeat(epoch=i, seq=1, sent_at=0.0, stats=stats)
        news[name] = ReplicaNews(size, hash_check_value(size), heartbeat, None, BlockSnapshot(i, 1, held))
    follower.apply(HubNews(1, news, 1))
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
    if args.churn_batches:
        _churn(follower, {name: news[name].snapshot.blocks for name in replicas}, args)
    return 0


def _churn(follower: KVIndexFollower, held: dict[str, list[bytes]], args: argparse.Namespace) -> None:
    """Apply `--churn-batches` batches, the replicas in turn, each evicting the replica's
    oldest `--churn-blocks` blocks and storing as many new ones; print the apply times."""
    index, count = follower.index, args.churn_blocks
    oldest_first = {name: deque(blocks) for name, blocks in held.items()}
    seqs = {name: index.replicas[name].last_seq for name in held}
    names = list(held)
    times = []
    for k in range(args.churn_batches):
        name = names[k % len(names)]
        blocks = oldest_first[name]
        evicted = [blocks.popleft() for _ in range(min(count, len(blocks)))]
        stored = [os.urandom(32) for _ in range(count)]  # as a block hash: 32 uniform bytes
        blocks.extend(stored)
        seqs[name] += 1
        batch = KVEventBatch(index.replicas[name].epoch, seqs[name], 0.0, [
            BlockRemoved(evicted, DEVICE_MEDIUM),
            BlockStored(stored, None, [], args.block_size, None, DEVICE_MEDIUM, DEFAULT_RETENTION_PRIORITY)])
        start = time.perf_counter()
        fate = index.apply(name, batch)
        times.append(time.perf_counter() - start)
        if fate is not Fate.APPLIED:  # its time would be of a batch turned away
            raise RuntimeError(f"churn batch {seqs[name]} of {name}: {fate.value}")
    pick = _milliseconds_at(times)
    print(f"event batches ({count} blocks evicted and {count} stored each, {len(times)} batches): "
          f"p50 {pick(0.5):.3f} ms, p99 {pick(0.99):.3f} ms, p99.9 {pick(0.999):.3f} ms, worst {pick(1.0):.1f} ms")


def _milliseconds_at(times: list[float]):
    """The quantile q of `times` (seconds), in ms, as a function of q."""
    times = sorted(times)
    return lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3


def _step_cost(rng: random.Random) -> StepCost:
    """A replica's measured steps, as an H100 serving an 8B model might report them."""
    return StepCost(rng.uniform(0.008, 0.012), rng.uniform(5e-5, 8e-5), rng.uniform(5e-5, 1e-4), tokens_per_step=2048)
