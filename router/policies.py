"""Request-router policies for the LLMServer deployment, all Ray Serve `RequestRouter`s.

`kv` is ours: exact cached-prefix overlap from the KV index, weighed against load. The others
are baselines that run on the same cluster for comparison: `pow2` (Serve's default),
`round_robin`, and Ray Serve LLM's approximate `prefix_approx`.
"""

import itertools
import random
import time
from collections import Counter

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvserve.router import routing_metrics
from kvserve.router.kv_follower import KVIndexFollower


class KVAwareRouter(RequestRouter):
    """Sends a request where the most of its prompt is already cached, unless that replica
    is busier than the least busy one by more than `max_imbalance` requests.

    cost(replica) = uncached prompt tokens + `load_cost_tokens` x requests in flight there.
    """

    def initialize_state(self, block_size: int = 16, load_cost_tokens: int = 64, max_imbalance: int = 4):
        self.block_size = block_size
        self.load_cost_tokens = load_cost_tokens
        self.max_imbalance = max_imbalance
        self.in_flight: Counter[str] = Counter()
        self.follower: KVIndexFollower | None = None
        self.known: set[str] = set()

    def _follower(self) -> KVIndexFollower:
        if self.follower is None:
            self.follower = KVIndexFollower.for_app(self._deployment_id.app_name, self.block_size)
        self.follower.ensure_running()
        return self.follower

    def load(self, replica: str) -> int:
        """Requests in flight there: ours, or the replica's own count if that is larger
        (other ingress replicas route to it too)."""
        stats = self._follower().stats.get(replica, {})
        return max(self.in_flight[replica], stats.get("running", 0) + stats.get("waiting", 0))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        start = time.perf_counter()
        ranked, reason = self.rank(candidate_replicas, pending_request)
        routing_metrics.record_decision("kv", reason, time.perf_counter() - start)
        return ranked

    def rank(self, candidates: list[RunningReplica], pending_request) -> tuple[list[list[RunningReplica]], str]:
        if not candidates:
            return [], "no_replica"
        request = pending_request.args[0] if pending_request and pending_request.args else None
        hashes = getattr(request, "block_hashes", None) or []
        num_tokens = len(getattr(request, "prompt_token_ids", None) or [])
        follower = self._follower()
        ids = [r.replica_id.unique_id for r in candidates]
        matched = follower.index.prefix_matches(hashes, [i for i in ids if i in follower.index.replicas])
        loads = {i: self.load(i) for i in ids}
        least = min(loads.values())

        def cost(i: str) -> float:
            uncached = num_tokens - matched.get(i, 0) * self.block_size
            return uncached + self.load_cost_tokens * loads[i]

        usage = {i: self._kv_usage(i) for i in ids}
        order = sorted(range(len(candidates)), key=lambda k: (cost(ids[k]), loads[ids[k]], usage[ids[k]], random.random()))
        allowed = [k for k in order if loads[ids[k]] - least <= self.max_imbalance]
        held_back = [k for k in order if k not in allowed]
        best = allowed[0]
        reason = self._reason(matched.get(ids[best], 0), max(matched.values(), default=0), held_back)
        return [[candidates[best]]] + [[candidates[k]] for k in allowed[1:] + held_back], reason

    def _kv_usage(self, replica: str) -> float:
        stats = self._follower().stats.get(replica, {})
        return stats.get("kv_blocks_used", 0) / max(stats.get("kv_blocks_total", 1), 1)

    @staticmethod
    def _reason(best_match: int, top_match: int, held_back: list) -> str:
        if top_match == 0:
            return "no_cached_prefix"
        if best_match == top_match:
            return "cached_prefix"
        return "load_guard" if held_back else "load_balance"

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.in_flight[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        key = replica_id.unique_id
        if self.in_flight[key] > 0:
            self.in_flight[key] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id.unique_id, None)
        if self.follower is not None:
            self.follower.forget(replica_id.unique_id, departed=True)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        if self.follower is not None:
            for replica in self.known - live:
                self.follower.forget(replica, departed=True)
        self.known = live


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn."""

    def initialize_state(self, **_):
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        first = next(self._turn) % len(ordered)
        routing_metrics.record_decision("round_robin", "turn", 0.0)
        return [[r] for r in ordered[first:] + ordered[:first]]


class Pow2Router(PowerOfTwoChoicesRequestRouter):
    """Serve's default, with our decision counter."""

    def initialize_state(self, **_):
        pass

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        routing_metrics.record_decision("pow2", "random_pair", 0.0)
        return await super().choose_replicas(candidate_replicas, pending_request)


def policy_class(name: str) -> type:
    """The router class for a policy name of the config."""
    if name == "prefix_approx":
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
            PrefixCacheAffinityRouter,
        )

        return PrefixCacheAffinityRouter
    return {"kv": KVAwareRouter, "pow2": Pow2Router, "round_robin": RoundRobinRouter}[name]


POLICIES = ("kv", "pow2", "round_robin", "prefix_approx")
