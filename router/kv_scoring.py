"""The KV-aware routing decision, free of Serve so that it can be tested and timed alone."""

import random
from collections import Counter
from dataclasses import dataclass

from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.working_sets import WorkingSets
from kvserve.workers.block_hash import BlockHash


@dataclass
class KVScorer:
    """cost(replica) = prompt tokens it would compute
                     + `load_cost_tokens` x requests in flight there
                     + the tokens of its new blocks x the share of its pool that recent
                       traffic keeps wanted (the cached work those blocks push out, now or
                       as the conversations there grow).
    The last term places new prefixes by the replicas' working sets (`WorkingSets`), not by
    their momentary load nor by blocks that sit cached but unwanted: the live prefixes spread
    over the cluster's whole cache, and a prefix every replica could use (a system prompt)
    does not pull every new conversation onto its first holder. Equal costs go to the
    replica with the most free room in its pool. A replica busier than the least busy one by
    more than `max_imbalance` requests is held back to the end of the ranking, whatever it
    caches: that stops a hot prefix from piling every request onto its holder."""

    follower: KVIndexFollower
    block_size: int = 16
    load_cost_tokens: int = 64
    max_imbalance: int = 4
    working_set_window_s: float = 60.0
    recent_s: float = 5.0  # by when a request's KV events have normally reached the index

    def __post_init__(self):
        self.in_flight: Counter[str] = Counter()
        self.working_sets = WorkingSets(self.working_set_window_s)

    def record(self, replica: str, block_hashes: list[BlockHash]) -> None:
        """The request with these blocks goes to `replica`."""
        total = self.follower.stats.get(replica, {}).get("kv_blocks_total")
        self.working_sets.add(replica, block_hashes, limit=2 * total if total else None)

    def forget(self, replica: str) -> None:
        self.in_flight.pop(replica, None)
        self.working_sets.forget(replica)

    def load(self, replica: str) -> int:
        """Requests in flight there: ours, or the replica's own count if that is larger
        (other ingress replicas route to it too)."""
        stats = self.follower.stats.get(replica, {})
        return max(self.in_flight[replica], stats.get("running", 0) + stats.get("waiting", 0))

    def occupied_blocks(self, replica: str) -> int:
        """Blocks of its pool that hold something: cached (exact, from the index) or in use."""
        state = self.follower.index.replicas.get(replica)
        cached = len(state.blocks) if state is not None else 0
        return max(cached, self.follower.stats.get(replica, {}).get("kv_blocks_used", 0))

    def fill(self, replica: str) -> float:
        total = self.follower.stats.get(replica, {}).get("kv_blocks_total")
        return min(self.occupied_blocks(replica) / total, 1.0) if total else 0.0

    def pressure(self, replica: str) -> float:
        """Its working set, or the blocks in use if more, over its pool: above 1 (up to 2)
        when the traffic sent there already wants more than it can cache."""
        stats = self.follower.stats.get(replica, {})
        total = stats.get("kv_blocks_total")
        wanted = max(self.working_sets.blocks(replica), stats.get("kv_blocks_used", 0))
        return wanted / total if total else 0.0

    def rank(self, replicas: list[str], block_hashes: list[BlockHash], num_tokens: int) -> tuple[list[int], str]:
        """Indices of `replicas`, best first, and the reason for the first choice."""
        index = self.follower.index
        trusted = [r for r in replicas if r in index.replicas]
        matched = index.prefix_matches(block_hashes, trusted)
        for replica, depth in self.working_sets.recent_matches(block_hashes, trusted, self.recent_s).items():
            matched[replica] = max(depth, matched.get(replica, 0))
        depths = [matched.get(r, 0) for r in replicas]
        loads = [self.load(r) for r in replicas]
        fills = [self.fill(r) for r in replicas]
        pressures = [self.pressure(r) for r in replicas]
        least = min(loads)
        prompt_blocks = -(-num_tokens // self.block_size)
        costs = [
            num_tokens - depth * self.block_size
            + self.load_cost_tokens * load
            + self.block_size * (prompt_blocks - depth) * pressure
            for depth, load, pressure in zip(depths, loads, pressures)
        ]
        order = sorted(range(len(replicas)), key=lambda k: (costs[k], loads[k], fills[k], random.random()))
        allowed = [k for k in order if loads[k] - least <= self.max_imbalance]
        held_back = [k for k in order if loads[k] - least > self.max_imbalance]
        top = max(matched.values(), default=0)
        return allowed + held_back, self._reason(depths[allowed[0]], top, held_back)

    @staticmethod
    def _reason(best_match: int, top_match: int, held_back: list[int]) -> str:
        if top_match == 0:
            return "no_cached_prefix"
        if best_match == top_match:
            return "cached_prefix"
        return "load_guard" if held_back else "load_balance"
