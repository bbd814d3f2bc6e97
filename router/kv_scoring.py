"""The KV-aware routing decision, free of Serve so that it can be tested and timed alone."""

import random
from collections import Counter
from dataclasses import dataclass

from kvserve.router import routing_metrics
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.options import RouterOptions
from kvserve.router.working_sets import WorkingSets
from kvserve.workers.protocol import BlockHash, EngineStats


@dataclass
class KVScorer:
    """cost(replica) = prompt tokens it would compute
                     + `options.load_cost_tokens` x requests in flight there
                     + the tokens of its new blocks x the share of its pool that recent
                       traffic keeps wanted (the cached work those blocks push out, now or
                       as the conversations there grow).
    The last term places new prefixes by the replicas' working sets (`WorkingSets`), not by
    their momentary load nor by blocks that sit cached but unwanted: the live prefixes spread
    over the cluster's whole cache, and a prefix every replica could use (a system prompt)
    does not pull every new conversation onto its first holder. Equal costs go to the
    replica with the most free room in its pool. A replica busier than the least busy one by
    more than `options.max_imbalance` requests is held back to the end of the ranking,
    whatever it caches: that stops a hot prefix from piling every request onto its holder."""

    follower: KVIndexFollower
    block_size: int
    options: RouterOptions = RouterOptions()

    def __post_init__(self):
        self.in_flight: Counter[str] = Counter()
        self.working_sets = WorkingSets(self.options.working_set_window_s)

    def _stats(self, replica: str) -> EngineStats | None:
        """What the replica last published; None until the hub has passed it on."""
        return self.follower.stats.get(replica)

    def record(self, replica: str, block_hashes: list[BlockHash]) -> None:
        """The request with these blocks goes to `replica`."""
        stats = self._stats(replica)
        self.working_sets.add(replica, block_hashes, limit=2 * stats.kv_blocks_total if stats else None)

    def forget(self, replica: str) -> None:
        self.in_flight.pop(replica, None)
        self.working_sets.forget(replica)

    def load(self, replica: str) -> int:
        """Requests in flight there: ours, or the replica's own count if that is larger
        (other ingress replicas route to it too)."""
        stats = self._stats(replica)
        return max(self.in_flight[replica], stats.running + stats.waiting if stats else 0)

    def fill(self, replica: str) -> float:
        """The share of its pool that holds something: cached (exact, from the index) or in use."""
        stats = self._stats(replica)
        if stats is None:
            return 0.0
        state = self.follower.index.replicas.get(replica)
        cached = len(state.blocks) if state is not None else 0
        return min(max(cached, stats.kv_blocks_used) / stats.kv_blocks_total, 1.0)

    def pressure(self, replica: str) -> float:
        """Its working set, or the blocks in use if more, over its pool: above 1 (up to 2)
        when the traffic sent there already wants more than it can cache."""
        stats = self._stats(replica)
        if stats is None:
            return 0.0
        return max(self.working_sets.blocks(replica), stats.kv_blocks_used) / stats.kv_blocks_total

    def rank(self, replicas: list[str], block_hashes: list[BlockHash], num_tokens: int) -> tuple[list[int], str]:
        """Indices of `replicas`, best first, and the reason for the first choice."""
        known = self._known(replicas)
        matched = self.follower.index.prefix_matches(block_hashes, known)
        for replica, depth in self.working_sets.recent_matches(block_hashes, known, self.options.recent_s).items():
            matched[replica] = max(depth, matched.get(replica, 0))
        depths = [matched.get(r, 0) for r in replicas]
        loads = [self.load(r) for r in replicas]
        fills = [self.fill(r) for r in replicas]
        pressures = [self.pressure(r) for r in replicas]
        least = min(loads)
        prompt_blocks = -(-num_tokens // self.block_size)
        costs = [
            num_tokens - depth * self.block_size
            + self.options.load_cost_tokens * load
            + self.block_size * (prompt_blocks - depth) * pressure
            for depth, load, pressure in zip(depths, loads, pressures)
        ]
        order = sorted(range(len(replicas)), key=lambda k: (costs[k], loads[k], fills[k], random.random()))
        allowed = [k for k in order if loads[k] - least <= self.options.max_imbalance]
        held_back = [k for k in order if loads[k] - least > self.options.max_imbalance]
        top = max(matched.values(), default=0)
        return allowed + held_back, self._reason(depths[allowed[0]], top, held_back)

    def _known(self, replicas: list[str]) -> list[str]:
        """The replicas whose caches we may count on. An unknown one (restarted, lost events,
        silent) is scored as caching nothing, not even what we recently sent it."""
        known = self.follower.known(replicas)
        if len(known) < len(replicas) and set(replicas) - set(known) - self.follower.rejected:
            routing_metrics.UNKNOWN_DECISIONS.inc()
        return known

    @staticmethod
    def _reason(best_match: int, top_match: int, held_back: list[int]) -> str:
        if top_match == 0:
            return "no_cached_prefix"
        if best_match == top_match:
            return "cached_prefix"
        return "load_guard" if held_back else "load_balance"
