"""The KV event hub's part in the simulation: replicas publish, routers hear it late.

Each replica appends to its `EventStream` what LLMServer sends the hub: its registration
(an empty snapshot and a heartbeat) and then, after steps, (event batch or None, heartbeat).
Each ingress router has a `DelayedFeed` that hands its real `KVIndexFollower` the real
`HubNews` the hub would have answered `delay_s` ago: first each replica's snapshot, then
the batches after the follower's cursor with the latest heartbeat (whose `EngineStats` are
the load the routers see). An idle replica that published nothing for a heartbeat period
sends its last heartbeat again with a new time, as LLMServer's idle loop does, so that routers
do not take it for silent; in a step it sends nothing until the step ends, as the engine's
thread does.
"""

import bisect
import dataclasses
from collections import deque

from kvserve.router.kv_follower import KVIndexFollower
from kvserve.workers.engine.block_hash import hash_check_value
from kvserve.workers.protocol import (
    HEARTBEAT_PERIOD_S, BlockSnapshot, Heartbeat, HubNews, KVEventBatch, ReplicaNews,
)


class EventStream:
    """One replica's publications in order; entries every follower has read are dropped."""

    def __init__(self, name: str, block_size: int, snapshot: BlockSnapshot, heartbeat: Heartbeat):
        self.name = name
        self.block_size = block_size
        self.hash_check = hash_check_value(block_size)
        self.registration = ReplicaNews(block_size, self.hash_check, heartbeat, None, snapshot)
        self.times: list[float] = []
        self.batches: list[KVEventBatch | None] = []
        self.heartbeats: list[Heartbeat] = []
        self.dropped = 0  # entries removed from the front
        self.last_published = heartbeat.sent_at
        self.steps: deque[tuple[float, float]] = deque()  # (start, end) of the steps not yet known to be over

    def stepping(self, start: float, end: float) -> None:
        self.steps.append((start, end))

    def step_end(self, at: float) -> float | None:
        """When the step in flight at `at` ends, or None if none is. Ask with `at` never
        decreasing: the steps over by then are forgotten."""
        steps = self.steps
        while steps and steps[0][1] <= at:
            steps.popleft()
        return steps[0][1] if steps and steps[0][0] < at else None

    def publish(self, now: float, batch: KVEventBatch | None, heartbeat: Heartbeat) -> None:
        self.times.append(now)
        self.batches.append(batch)
        self.heartbeats.append(heartbeat)
        self.last_published = now

    def drop_before(self, position: int) -> None:
        """Forget the entries before absolute `position` (read by every follower)."""
        count = position - self.dropped
        if count > 0:
            del self.times[:count], self.batches[:count], self.heartbeats[:count]
            self.dropped = position

    def news(self, heartbeat: Heartbeat, batches: list[KVEventBatch]) -> ReplicaNews:
        return ReplicaNews(self.block_size, self.hash_check, heartbeat, batches, None)


class DelayedFeed:
    """Keeps one router's follower at what the hub knew `delay_s` before the router's clock;
    the hub's followers are the simulated cluster's `routers`."""

    def __init__(self, follower: KVIndexFollower, streams: list[EventStream], delay_s: float, routers: int):
        self.follower = follower
        self.routers = routers
        self.streams = streams
        self.delay_s = delay_s
        self.cursors: list[int | None] = [None] * len(streams)  # None: snapshot not yet delivered
        self.heard: list[Heartbeat | None] = [None] * len(streams)
        self.quiet: list[ReplicaNews | None] = [None] * len(streams)  # "nothing new" for each replica
        self.next_due = 0.0  # horizon at which something new is there to hear
        self.version = 0

    def catch_up(self, now: float) -> None:
        horizon = now - self.delay_s
        if horizon < self.next_due:
            return
        if None in self.cursors:
            self._register(horizon)
        news, next_due = {}, float("inf")
        for k, stream in enumerate(self.streams):
            news[stream.name], due = self._replica_news(k, stream, horizon)
            next_due = min(next_due, due)
        self._apply(news)
        self.next_due = next_due

    def _register(self, horizon: float) -> None:
        """The snapshot of every replica registered by `horizon` (all register at time 0)."""
        news = {}
        for k, stream in enumerate(self.streams):
            if self.cursors[k] is None:
                self.cursors[k] = stream.dropped
                self._heard(k, stream, stream.registration.heartbeat)
                news[stream.name] = stream.registration
            else:
                news[stream.name] = self.quiet[k]
        self._apply(news)

    def _replica_news(self, k: int, stream: EventStream, horizon: float) -> tuple[ReplicaNews, float]:
        """The news of one replica up to `horizon`, and the horizon of its next news."""
        start = self.cursors[k] - stream.dropped
        end = bisect.bisect_right(stream.times, horizon, lo=start)
        step_end = stream.step_end(horizon)
        if end > start:
            heartbeat = stream.heartbeats[end - 1]
            batches = [b for b in stream.batches[start:end] if b is not None]
            self.cursors[k] = end + stream.dropped
            news = stream.news(heartbeat, batches)
            self._heard(k, stream, heartbeat)
        elif step_end is None and horizon - self.heard[k].sent_at >= HEARTBEAT_PERIOD_S:
            news = stream.news(dataclasses.replace(self.heard[k], sent_at=horizon), [])
            self._heard(k, stream, news.heartbeat)
        else:
            news = self.quiet[k]
        due = self.heard[k].sent_at + HEARTBEAT_PERIOD_S if step_end is None else step_end
        if end < len(stream.times):
            due = min(due, stream.times[end])
        return news, due

    def _heard(self, k: int, stream: EventStream, heartbeat: Heartbeat) -> None:
        self.heard[k] = heartbeat
        self.quiet[k] = stream.news(heartbeat, [])

    def _apply(self, news: dict[str, ReplicaNews]) -> None:
        self.version += 1
        self.follower.apply(HubNews(self.version, news, self.routers, frozenset(news)))


def drop_read_entries(streams: list[EventStream], feeds: list[DelayedFeed]) -> None:
    """Free what every feed has passed on (all of it when no router follows events)."""
    for k, stream in enumerate(streams):
        read = [feed.cursors[k] for feed in feeds]
        if not feeds:
            stream.drop_before(stream.dropped + len(stream.times))
            stream.steps.clear()
        elif None not in read:
            stream.drop_before(min(read))
