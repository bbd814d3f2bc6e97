"""The discrete-event loop: requests arrive at ingress routers, are routed, and run on
simulated replicas in simulated time; nothing sleeps.

Three kinds of event: an arrival (routed at once by its ingress router, or queued there
while every replica is at `max_ongoing_requests`, or refused when that queue is full, as
Serve does; or refused by the replica it is sent to, past `max_queue_wait_s`); the end of a
replica's step (tokens appended, finished requests reported back to the router that sent
them, queued requests routed again, the next step scheduled); and a request's delivery to
its replica, `route_call_s` per remote call its policy waited on to decide (Ray's tree asks
its tree actor) after its router took it, at once for the others. Ties go to the step end,
then to a delivery. The routers hear the replicas' KV events and load `event_delay_s` late.
"""

import gc
import heapq
import random
import time
from collections import deque
from dataclasses import dataclass

from kvserve.cluster.bench.sim.prompts import BlockChains
from kvserve.cluster.bench.sim.relay import DelayedFeed, drop_read_entries
from kvserve.cluster.bench.sim.replica import EngineLimits, Job, SimReplica
from kvserve.cluster.bench.sim.routers import ClusterView, make_policy, uses_events
from kvserve.cluster.bench.sim.workloads import WorkItem
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.options import RouterOptions


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 4
    ingress: int = 1
    block_size: int = 16
    kv_blocks: int | None = None  # per replica; default: what the step-time model's GPU leaves
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    max_ongoing_requests: int | None = None  # default: max_num_seqs, as ServingConfig's
    max_queued_requests: int = 512  # per ingress router; -1: no limit
    max_queue_wait_s: float | None = None  # EngineConfig's: a replica refuses a newcomer past it
    event_delay_s: float = 0.05
    route_call_s: float = 0.0005  # one remote call a policy makes on a request's path (`RoutingPolicy.calls_on_path`)
    seed: int = 0
    router_options: RouterOptions = RouterOptions()

    def __post_init__(self):
        if self.max_ongoing_requests is None:
            object.__setattr__(self, "max_ongoing_requests", self.max_num_seqs)


class SimClock:
    """The simulated time, read by calling it. An object of its own, not a closure over the
    cluster, so that the routers holding it tie no reference cycle through the cluster."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Router:
    """One ingress replica's request router: its policy, its feed, its queue."""

    def __init__(self, policy, feed: DelayedFeed | None):
        self.policy, self.feed = policy, feed
        self.queue: deque[Job] = deque()


class Cluster:
    def __init__(self, policy: str, config: SimConfig, step_time, chains: BlockChains):
        random.seed(config.seed)  # KVScorer breaks ties with the `random` module
        self.config = config
        self.chains = chains
        self.clock = SimClock()
        limits = EngineLimits(config.kv_blocks or step_time.kv_blocks(config.block_size), config.block_size,
                              config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len,
                              config.max_queue_wait_s)
        if limits.num_blocks < 1:
            raise ValueError("the step-time model leaves no room for a KV pool: choose another preset or --kv-blocks")
        follows = uses_events(policy)
        self.replicas = [SimReplica(f"replica-{k}", limits, step_time, self.clock, publish=follows)
                         for k in range(config.replicas)]
        self.ongoing = [0] * config.replicas
        view = ClusterView([r.name for r in self.replicas], config.block_size, self.clock, self.ongoing,
                           random.Random(config.seed + 1))
        self.routers, shared = [], {}
        for k in range(config.ingress):
            follower = KVIndexFollower(f"sim-{k}", config.block_size, clock=self.clock) if follows else None
            feed = (DelayedFeed(follower, [r.stream for r in self.replicas], config.event_delay_s, config.ingress)
                    if follows else None)
            self.routers.append(_Router(make_policy(policy, view, follower, config.router_options, shared), feed))
        self.feeds = [r.feed for r in self.routers if r.feed is not None]
        self.steps: list[tuple[float, int]] = []  # (end, replica) of the steps in flight
        self.ingress_rng = random.Random(config.seed + 2)
        self.steps_done = 0
        self.answering: dict[int, Job] = {}  # by `WorkItem.reply`: the jobs not ended yet
        self.held: dict[int, Job] = {}  # by the `reply` they follow: jobs waiting for that answer
        self.followers: list[tuple[float, int, Job]] = []  # (arrival, index, job) of the held, once their answer ended
        self.deliveries: list[tuple[float, int, int, Job]] = []  # (when, index, replica, job): sent, not yet there

    def run(self, items: list[WorkItem]) -> list[Job]:
        """Every request to its end (finished or refused); the jobs in arrival order."""
        jobs = []
        for index, item in enumerate(items):
            self._run_until(item.arrival_s)
            self.clock.now = item.arrival_s
            job = Job(index, item, self.chains.chain(item.segments), self.ingress_rng.randrange(len(self.routers)),
                      item.arrival_s)
            jobs.append(job)
            self.answering[item.reply] = job
            if item.after in self.answering:  # it follows an answer not written yet
                self.held[item.after] = job
            else:
                self._arrive(job)
        self._run_until(float("inf"))
        return jobs

    def _run_until(self, t: float) -> None:
        """The step ends, deliveries and held requests' arrivals up to `t`, in time order (a
        step end first, then a delivery)."""
        steps, followers, deliveries = self.steps, self.followers, self.deliveries
        while True:
            step_end = steps[0][0] if steps else float("inf")
            delivery = deliveries[0][0] if deliveries else float("inf")
            follower_arrival = followers[0][0] if followers else float("inf")
            if step_end <= min(delivery, follower_arrival, t) and steps:
                self._end_step(*heapq.heappop(steps))
            elif delivery <= min(follower_arrival, t) and deliveries:
                self.clock.now, _, k, job = heapq.heappop(deliveries)
                self._deliver(job, k)
            elif follower_arrival <= t and followers:
                self.clock.now, _, job = heapq.heappop(followers)
                self._arrive(job)
            else:
                return

    def _arrive(self, job: Job) -> None:
        problem = self.replicas[0].refusal(job.item)
        if problem is not None:
            self._refuse(job, problem)
            return
        router = self.routers[job.router]
        if any(r.queue for r in self.routers) or not self._route(job):
            limit = self.config.max_queued_requests
            if 0 <= limit <= len(router.queue):
                self._refuse(job, "queue full")
            else:
                router.queue.append(job)

    def _refuse(self, job: Job, why: str) -> None:
        job.refused = why
        self._answered(job)

    def _answered(self, job: Job) -> None:
        """`job` has ended (finished or refused): the request that follows its answer arrives
        its `after_s` later."""
        del self.answering[job.item.reply]
        follower = self.held.pop(job.item.reply, None)
        if follower is not None:
            follower.arrival_s = self.clock.now + follower.item.after_s
            heapq.heappush(self.followers, (follower.arrival_s, follower.index, follower))

    def _route(self, job: Job) -> bool:
        """Send to the first replica of the ranking below max_ongoing_requests; False if none."""
        router = self.routers[job.router]
        if router.feed is not None:
            router.feed.catch_up(self.clock.now)
        limit = self.config.max_ongoing_requests
        start = time.perf_counter()
        ranking = router.policy.rank(job)
        job.decision_s = time.perf_counter() - start
        for k in ranking:
            if self.ongoing[k] < limit:
                self._send(job, k)
                return True
        return False

    def _send(self, job: Job, k: int) -> None:
        job.replica = k
        refusal = self.replicas[k].overload(self.clock.now)
        if refusal is not None:  # the router counted it sent and done at once, as Serve does
            self.routers[job.router].policy.refused(k, job)
            self._refuse(job, refusal)
            return
        self.ongoing[k] += 1
        policy = self.routers[job.router].policy
        policy.sent(k, job)
        delay = policy.calls_on_path * self.config.route_call_s
        if delay > 0:
            heapq.heappush(self.deliveries, (self.clock.now + delay, job.index, k, job))
        else:
            self._deliver(job, k)

    def _deliver(self, job: Job, k: int) -> None:
        replica = self.replicas[k]
        replica.add(job, self.clock.now)
        if not replica.busy:
            self._start_step(k)

    def _start_step(self, k: int) -> None:
        end = self.replicas[k].start_step(self.clock.now)
        if end is not None:
            heapq.heappush(self.steps, (end, k))

    def _end_step(self, end: float, k: int) -> None:
        self.clock.now = end
        first, finished = self.replicas[k].end_step(end)
        for job in first:
            self.routers[job.router].policy.first_token(k, job)
        for job in finished:
            self.ongoing[k] -= 1
            self.routers[job.router].policy.done(k, job)
        self._start_step(k)
        if finished:
            self._route_queued()
            for job in finished:
                self._answered(job)
        self.steps_done += 1
        if self.steps_done % 4096 == 0:
            drop_read_entries([r.stream for r in self.replicas if r.stream is not None], self.feeds)

    def _route_queued(self) -> None:
        """Queued requests, oldest first across routers, while some replica has room."""
        while True:
            waiting = [r for r in self.routers if r.queue]
            if not waiting:
                return
            router = min(waiting, key=lambda r: r.queue[0].arrival_s)
            if not self._route(router.queue[0]):
                return
            router.queue.popleft()


def simulate(policy: str, items: list[WorkItem], step_time, config: SimConfig,
             chains: BlockChains | None = None) -> list[Job]:
    """One run of `policy` over `items`; `chains` may be shared by runs of the same block size."""
    chains = chains or BlockChains(config.block_size)
    # A run holds millions of long-lived objects (blocks, hashes, sequences) and makes no
    # reference cycles: the cyclic collector's full passes over them cost a quarter of the run
    # and free nothing, so it is paused for the run, and reference counting frees the cluster
    # at its end (a cycle would leave it all to the collector's first pass after the run).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return Cluster(policy, config, step_time, chains).run(items)
    finally:
        if collecting:
            gc.enable()
