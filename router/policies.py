"""Request-router policies for the LLMServer deployment, all Ray Serve `RequestRouter`s.

`kv` is ours: exact cached-prefix overlap from the KV index, weighed against load. The others
are baselines that run on the same cluster for comparison: `pow2` (Serve's default),
`round_robin`, and Ray Serve LLM's approximate `prefix_approx`.
"""

import itertools
import time

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvserve.router import routing_metrics
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.kv_scoring import KVScorer, register_scorer
from kvserve.router.options import Policy, RouterOptions


# How long a choice not yet followed by its send counts as in flight (a request cancelled
# while it waited for a replica is never sent).
UNSENT_CHOICE_S = 5.0


class KVAwareRouter(RequestRouter):
    """Ranks replicas with `KVScorer` over the local copy of the KV index (no remote call).

    Serve routes the requests that wait together one after another, with no pause between,
    and reports each send only after the last is routed: a choice counts as in flight on the
    replica chosen as soon as it is made, or the whole burst would go where the first did.
    The send moves the count where the request really went (the first choice may be full)."""

    def initialize_state(self, block_size: int, kv_event_hubs: int = 1, **options):
        self.block_size = block_size
        self.kv_event_hubs = kv_event_hubs
        self.options = RouterOptions(**options)
        self.follower: KVIndexFollower | None = None
        self.scorer: KVScorer | None = None
        self.known: set[str] = set()
        self.unsent: dict[str, tuple[float, str]] = {}  # request id -> (chosen when, replica counted)

    def _scorer(self) -> KVScorer:
        if self.scorer is None:
            app_name = self._deployment_id.app_name
            self.follower = KVIndexFollower.for_app(app_name, self.block_size, self.kv_event_hubs)
            self.scorer = KVScorer(self.follower, self.block_size, self.options)
            register_scorer(app_name, self.scorer)
        self.follower.ensure_running()
        return self.scorer

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        start = time.perf_counter()
        request = pending_request.args[0] if pending_request and pending_request.args else None
        hashes = getattr(request, "block_hashes", None) or []
        num_tokens = len(getattr(request, "prompt_token_ids", None) or [])
        priority = getattr(request, "priority", 0)
        lora_name = getattr(request, "lora_name", None)
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        scorer = self._scorer()
        order, reason = scorer.rank(ids, hashes, num_tokens, priority, lora_name)
        scorer.record(ids[order[0]], hashes, lora_name)
        if pending_request is not None:
            self._count_choice(pending_request.metadata.internal_request_id, ids[order[0]])
        routing_metrics.record_decision("kv", reason, time.perf_counter() - start)
        return [[candidate_replicas[k]] for k in order]

    def _count_choice(self, request_id: str, replica: str) -> None:
        """Count `replica` as running request `request_id` until its send is reported; a
        request chosen for again (its replicas were full) moves its count."""
        scorer, now = self.scorer, time.monotonic()
        while self.unsent:  # the dict keeps the choices in the order made: the oldest first
            oldest, (chosen_at, chosen) = next(iter(self.unsent.items()))
            if chosen_at >= now - UNSENT_CHOICE_S:
                break
            del self.unsent[oldest]
            scorer.request_completed(chosen)
        if request_id in self.unsent:
            scorer.request_completed(self.unsent.pop(request_id)[1])
        self.unsent[request_id] = (now, replica)
        scorer.request_sent(replica)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        # Serve calls this for every request sent (on_request_routed only under its
        # strict max_ongoing_requests mode); on_request_completed balances it. The send does
        # not say which request it carries: the oldest choice of this replica, else the
        # oldest choice anywhere (it went to a later one in its ranking), was this one.
        super().on_send_request(replica_id)
        replica, scorer = replica_id.unique_id, self._scorer()
        choice = next((r for r, (_, chosen) in self.unsent.items() if chosen == replica), None)
        if choice is not None:
            del self.unsent[choice]
            return
        if self.unsent:
            scorer.request_completed(self.unsent.pop(next(iter(self.unsent)))[1])
        scorer.request_sent(replica)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._scorer().request_completed(replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id.unique_id})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        self._forget(self.known - live)
        self.known = live

    def _forget(self, replicas: set[str]) -> None:
        if self.scorer is None:
            return
        for replica in replicas:
            self.scorer.forget(replica)
            self.follower.forget(replica, departed=True)


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


def policy_class(name: Policy) -> type:
    """The router class for a policy name of the config."""
    if name == "prefix_approx":
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
            PrefixCacheAffinityRouter,
        )

        return PrefixCacheAffinityRouter
    return {"kv": KVAwareRouter, "pow2": Pow2Router, "round_robin": RoundRobinRouter}[name]
