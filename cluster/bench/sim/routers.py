"""The routing policies the simulator compares, each as one ingress router sees the cluster.

`kv` is ours, run as `KVAwareRouter` runs it inside Serve: the real `KVScorer` over a real
`KVIndexFollower` (fed by `relay.DelayedFeed`), ranking, then `record` of the first choice,
`request_sent` and `request_completed` counting its requests in flight. The scorer's
`WorkingSets` reads the wall clock by default; here it is given the simulated one.
The baselines are in baselines.py. Serve sends a request to the first replica of the ranking
that is below `max_ongoing_requests`; the simulator does the same with every policy.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass

from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.kv_scoring import KVScorer
from kvserve.router.options import POLICIES, RouterOptions
from kvserve.router.working_sets import WorkingSets


@dataclass
class ClusterView:
    """What a router may look at besides its own state. `ongoing` is each replica's requests
    in flight right now, which Serve's queue-length probes read."""

    names: list[str]
    block_size: int
    clock: Callable[[], float]
    ongoing: list[int]
    rng: random.Random


class RoutingPolicy:
    """A ranking of the replicas for each request, and what the router learns as it goes."""

    uses_events = False  # whether it needs a follower of the replicas' KV events and load
    calls_on_path = 0  # the remote calls its last ranking waited on (each costs `SimConfig.route_call_s`)

    def rank(self, job) -> list[int]:
        raise NotImplementedError

    def sent(self, replica: int, job) -> None:
        pass

    def refused(self, replica: int, job) -> None:
        """`replica` refused `job` at once (past its queue wait): it caches none of it."""

    def first_token(self, replica: int, job) -> None:
        pass

    def done(self, replica: int, job) -> None:
        pass


class KVPolicy(RoutingPolicy):
    """Ours: router/policies.py's KVAwareRouter without Serve around it."""

    uses_events = True

    def __init__(self, view: ClusterView, follower: KVIndexFollower, options: RouterOptions):
        self.view = view
        self.scorer = KVScorer(follower, view.block_size, options)
        self.scorer.working_sets = WorkingSets(options.working_set_window_s, view.clock)

    def rank(self, job) -> list[int]:
        order, _ = self.scorer.rank(self.view.names, job.block_hashes, job.item.input_length)
        self.scorer.record(self.view.names[order[0]], job.block_hashes)
        return order

    def sent(self, replica: int, job) -> None:
        self.scorer.request_sent(self.view.names[replica])

    def refused(self, replica: int, job) -> None:
        self.scorer.withdraw(self.view.names[replica], job.block_hashes)

    def done(self, replica: int, job) -> None:
        self.scorer.request_completed(self.view.names[replica])


# The command line's names: the project's own policies (router/options.py) and the baselines
# that exist only here.
SIM_POLICIES: tuple[str, ...] = (*POLICIES, "dynamo", "llmd", "sglang", "random")


def make_policy(name: str, view: ClusterView, follower: KVIndexFollower | None, options: RouterOptions,
                shared: dict) -> RoutingPolicy:
    """One router's policy; `shared` holds what all ingress routers share (Ray's prefix tree
    lives in one actor for the whole application)."""
    from kvserve.cluster.bench.sim import baselines

    if name == "kv":
        return KVPolicy(view, follower, options)
    makers = {
        "prefix_approx": lambda: baselines.PrefixCacheAffinity(view, shared),
        "pow2": lambda: baselines.PowerOfTwo(view),
        "round_robin": lambda: baselines.RoundRobin(view),
        "random": lambda: baselines.RandomChoice(view),
        "dynamo": lambda: baselines.DynamoKV(view, follower),
        "llmd": lambda: baselines.LlmdPrecisePrefix(view, follower),
        "sglang": lambda: baselines.SGLangCacheAware(view),
    }
    if name not in makers:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(SIM_POLICIES)}")
    return makers[name]()


def uses_events(name: str) -> bool:
    return name in ("kv", "dynamo", "llmd")
