"""Other routers' published rules, on the same simulated cluster as ours, and the oracle.

Each class follows the source named in its docstring; where the original works on text
(SGLang, Ray) the simulator uses the prompt's block hashes instead, so its matches are whole
blocks. Those that read KV events (Dynamo, llm-d) share our follower and its delay, so that
only the scoring rule differs. Ties are broken at random.
"""

import bisect
import math
import random
from collections import OrderedDict

from kvserve.cluster.bench.sim.routers import ClusterView, RoutingPolicy
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.kv_index import leading_matches
from kvserve.workers.engine.block_hash import BlockHash


def _best_first(scores: list, rng: random.Random) -> list[int]:
    """Indices by ascending score, ties in random order."""
    return sorted(range(len(scores)), key=lambda k: (scores[k], rng.random()))


class RoundRobin(RoutingPolicy):
    """router/policies.py's RoundRobinRouter: the next replica in turn, the rest after it."""

    def __init__(self, view: ClusterView):
        self.view, self.turn = view, 0

    def rank(self, job) -> list[int]:
        n = len(self.view.names)
        first, self.turn = self.turn % n, self.turn + 1
        return list(range(first, n)) + list(range(first))


class RandomChoice(RoutingPolicy):
    def __init__(self, view: ClusterView):
        self.view = view

    def rank(self, job) -> list[int]:
        return self.view.rng.sample(range(len(self.view.names)), len(self.view.names))


class PowerOfTwo(RoutingPolicy):
    """Ray Serve's default (ray/serve/_private/request_router/pow_2_router.py): two replicas
    at random, the one with fewer requests in flight (probed) first."""

    def __init__(self, view: ClusterView):
        self.view = view

    def rank(self, job) -> list[int]:
        order = self.view.rng.sample(range(len(self.view.names)), len(self.view.names))
        pair = sorted(order[:2], key=lambda k: self.view.ongoing[k])
        return pair + order[2:]


class ApproxTrees:
    """Per replica, the blocks of the prompts sent to it, least recently sent first: the
    routers' own guess at the caches, with no events. A prompt's blocks are touched last
    block first, so that eviction takes a prompt's tail before its shared head."""

    def __init__(self, num_replicas: int):
        self.sent: list[OrderedDict[BlockHash, None]] = [OrderedDict() for _ in range(num_replicas)]

    def insert(self, replica: int, block_hashes: list[BlockHash]) -> int:
        """Record the prompt; returns how many of its blocks were new there."""
        held, before = self.sent[replica], len(self.sent[replica])
        for block_hash in reversed(block_hashes):
            held[block_hash] = None
            held.move_to_end(block_hash)
        return len(held) - before

    def matches(self, block_hashes: list[BlockHash]) -> list[int]:
        depths = leading_matches(block_hashes, list(range(len(self.sent))), self.sent.__getitem__)
        return [depths[k] for k in range(len(self.sent))]

    def size(self, replica: int) -> int:
        return len(self.sent[replica])

    def evict_to(self, replica: int, max_blocks: int) -> None:
        held = self.sent[replica]
        while len(held) > max_blocks:
            held.popitem(last=False)


class PrefixCacheAffinity(RoutingPolicy):
    """Ray Serve LLM's PrefixCacheAffinityRouter (the `prefix_approx` policy;
    ray/llm/_internal/serve/routing_policies/prefix_aware/prefix_aware_router.py, defaults
    of `initialize_state`): unless the queue lengths differ by more than
    `imbalanced_threshold` (default: infinite, so never), the candidates are the replicas
    with the longest match in a prefix tree of the prompts routed so far if the match is at
    least `match_rate_threshold` (0.1) of the prompt, else the replicas with the fewest
    characters in the tree; Serve takes the candidate with the shortest queue. A prompt is
    inserted under the replica it was sent to. The tree is one actor for all ingress
    replicas, so it is shared here too; eviction is off by default. The router waits on the
    actor to decide: one call for the match, and one more for the smallest trees where the
    match is short (`calls_on_path`); its insert after the send blocks only the router's
    later requests, and is left out."""

    def __init__(self, view: ClusterView, shared: dict, imbalanced_threshold: float = float("inf"),
                 match_rate_threshold: float = 0.1):
        self.view = view
        self.trees: ApproxTrees = shared.setdefault("prefix_tree", ApproxTrees(len(view.names)))
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        self.fallback = PowerOfTwo(view)

    def rank(self, job) -> list[int]:
        ongoing, rng = self.view.ongoing, self.view.rng
        fallback = self.fallback.rank(job)
        if max(ongoing) - min(ongoing) > self.imbalanced_threshold:
            self.calls_on_path = 0
            return fallback
        depths = self.trees.matches(job.block_hashes)
        best = max(depths)
        matched = best * self.view.block_size / job.item.input_length >= self.match_rate_threshold
        self.calls_on_path = 1 if matched else 2
        if matched:
            candidates = [k for k, depth in enumerate(depths) if depth == best]
        else:
            smallest = min(self.trees.size(k) for k in range(len(depths)))
            candidates = [k for k in range(len(depths)) if self.trees.size(k) == smallest]
        chosen = sorted(candidates, key=lambda k: (ongoing[k], rng.random()))
        return chosen + [k for k in fallback if k not in chosen]

    def sent(self, replica: int, job) -> None:
        self.trees.insert(replica, job.block_hashes)


class SGLangCacheAware(RoutingPolicy):
    """SGLang router's `cache_aware` policy (sgl-router, docs of its `--policy cache_aware`
    and defaults): if the load is imbalanced (busiest - idlest > `balance_abs_threshold` 64
    and busiest > `balance_rel_threshold` 1.5 x idlest, counting the requests this router has
    running on each worker), the least loaded worker; otherwise the worker whose tree of
    routed prompts matches the longest prefix, if the match exceeds `cache_threshold` (0.3)
    of the prompt, else the worker with the smallest tree. The prompt then goes into the
    chosen worker's tree; every `eviction_interval_s` (120 s) each tree is cut back to
    `max_tree_size` by least recent use (2^26 characters there; ~2^24 tokens here)."""

    def __init__(self, view: ClusterView, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, eviction_interval_s: float = 120.0,
                 max_tree_tokens: int = 1 << 24):
        self.view = view
        self.trees = ApproxTrees(len(view.names))
        self.load = [0] * len(view.names)
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_blocks = max_tree_tokens // view.block_size
        self.last_eviction = 0.0

    def rank(self, job) -> list[int]:
        self._evict()
        load, rng = self.load, self.view.rng
        busiest, idlest = max(load), min(load)
        if busiest - idlest > self.balance_abs_threshold and busiest > self.balance_rel_threshold * idlest:
            order = sorted(range(len(load)), key=lambda k: (load[k], rng.random()))
        else:
            depths = self.trees.matches(job.block_hashes)
            if max(depths) * self.view.block_size / job.item.input_length > self.cache_threshold:
                order = sorted(range(len(load)), key=lambda k: (-depths[k], load[k], rng.random()))
            else:
                order = sorted(range(len(load)), key=lambda k: (self.trees.size(k), load[k], rng.random()))
        self.trees.insert(order[0], job.block_hashes)
        return order

    def _evict(self) -> None:
        now = self.view.clock()
        if now - self.last_eviction >= self.eviction_interval_s:
            self.last_eviction = now
            for k in range(len(self.load)):
                self.trees.evict_to(k, self.max_tree_blocks)

    def sent(self, replica: int, job) -> None:
        self.load[replica] += 1

    def done(self, replica: int, job) -> None:
        self.load[replica] -= 1


class DynamoKV(RoutingPolicy):
    """NVIDIA Dynamo's KV router (docs: components/router, "Cost Calculation"): per worker,
    prefill blocks = the prompt blocks it has yet to prefill for requests this router sent
    there + this prompt's blocks not cached there (the overlap, from KV events), decode
    blocks = the blocks of its active requests + this prompt's new blocks; cost =
    `overlap_score_weight` (1.0) x prefill blocks + decode blocks; the lowest cost wins
    (router temperature 0). Prefill load is released at the first token, decode blocks when
    the request completes."""

    uses_events = True

    def __init__(self, view: ClusterView, follower: KVIndexFollower, overlap_score_weight: float = 1.0):
        self.view = view
        self.follower = follower
        self.weight = overlap_score_weight
        self.prefill = [0] * len(view.names)
        self.decode = [0] * len(view.names)
        self.new_blocks: dict[int, int] = {}  # per job: its blocks not cached where it went
        self.overlaps: list[int] = []

    def rank(self, job) -> list[int]:
        names = self.view.names
        blocks = -(-job.item.input_length // self.view.block_size)
        matched = self.follower.index.prefix_matches(job.block_hashes, names)
        self.overlaps = [matched.get(name, 0) for name in names]
        costs = [self.weight * (self.prefill[k] + blocks - self.overlaps[k]) + self.decode[k] + blocks - self.overlaps[k]
                 for k in range(len(names))]
        return _best_first(costs, self.view.rng)

    def sent(self, replica: int, job) -> None:
        new = -(-job.item.input_length // self.view.block_size) - self.overlaps[replica]
        self.new_blocks[job.index] = new
        self.prefill[replica] += new
        self.decode[replica] += new

    def first_token(self, replica: int, job) -> None:
        self.prefill[replica] -= self.new_blocks[job.index]

    def done(self, replica: int, job) -> None:
        self.decode[replica] -= self.new_blocks.pop(job.index)


class LlmdPrecisePrefix(RoutingPolicy):
    """llm-d's precise prefix-cache routing (its "precise-prefix-cache-routing" guide; the
    gateway-api-inference-extension scorers): score = 3 x the share of the prompt's blocks
    cached on the pod (from KV events) + 2 x queue score ((max - own) / (max - min) of the
    waiting queues, 1 when all equal) + 2 x KV-cache score (1 - the pool's used share), the
    queue and usage as last scraped (the replicas' load reports, as delayed as the events);
    the highest score wins."""

    uses_events = True

    def __init__(self, view: ClusterView, follower: KVIndexFollower, prefix_weight: float = 3.0,
                 queue_weight: float = 2.0, kv_weight: float = 2.0):
        self.view = view
        self.follower = follower
        self.weights = (prefix_weight, queue_weight, kv_weight)

    def rank(self, job) -> list[int]:
        names = self.view.names
        stats = [self.follower.stats.get(name) for name in names]
        matched = self.follower.index.prefix_matches(job.block_hashes, names)
        full = len(job.block_hashes)
        queues = [s.waiting if s else 0 for s in stats]
        most, least = max(queues), min(queues)
        prefix_w, queue_w, kv_w = self.weights
        scores = []
        for k, name in enumerate(names):
            prefix = matched.get(name, 0) / full if full else 0.0
            queue = (most - queues[k]) / (most - least) if most > least else 1.0
            kv = 1.0 - stats[k].kv_blocks_used / stats[k].kv_blocks_total if stats[k] else 1.0
            scores.append(-(prefix_w * prefix + queue_w * queue + kv_w * kv))
        return _best_first(scores, self.view.rng)


def oracle_hit_rate(items, chains, block_size: int, measured_from: float = -math.inf) -> float:
    """The hit rate of one unbounded cache that keeps every block ever seen (prompts and
    answers), with the engine's rule that the last prompt token is always computed; over the
    items scheduled to arrive from `measured_from` on (the cache fills from the first)."""
    seen: set[BlockHash] = set()
    hit = total = 0
    for item in items:
        hashes = chains.chain(item.segments)
        usable = (item.input_length - 1) // block_size
        # `seen` holds whole chains, and a chained hash names its whole prefix, so the blocks
        # of a prompt that are seen are a prefix of its chain: bisect for its end.
        depth = bisect.bisect_left(range(usable), True, key=lambda i: hashes[i] not in seen)
        if item.arrival_s >= measured_from:
            hit += depth * block_size
            total += item.input_length
        seen.update(hashes[depth:])
        seen.update(chains.added_hashes(item.segments, (item.reply, item.output_length)))
    return hit / total if total else 0.0
