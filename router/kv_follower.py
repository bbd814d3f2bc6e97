"""Keeps a local `KVIndex` in step with the KV event hub, in the background.

One follower per application and process: the request router of every handle in the process
and the ingress's /metrics read the same copy. Replicas whose block size or hash check value
differ from ours are kept out of the index (and counted), never trusted. A replica whose
news cannot be trusted (a gap, a heartbeat that disagrees with the index, a new epoch) is
dropped from the index, unknown until the hub's next answer brings a snapshot; batches of
another epoch than the index's are fenced, never applied.
"""

import asyncio
import gc
import logging
import math
import time
import uuid
from collections.abc import Iterator

import numpy as np
import ray

from kvserve.router import routing_metrics as metrics
from kvserve.router.kv_index import SILENCE_S, Fate, KVIndex
from kvserve.router.replica_table import ReplicaTable, StepCostTable
from kvserve.workers.engine.block_hash import hash_check_value
from kvserve.workers.protocol import EngineStats, Heartbeat, HubNews, KVCursor, ReplicaNews
from kvserve.workers.kv_event_hub import hub_name

logger = logging.getLogger(__name__)

FOLLOW_TIMEOUT_S = 2.0
# The shortest time between two polls of one hub. Its answer comes at the first publish after
# the last one, and building it costs the hub a pass over its replicas' cursors: at 16
# ingress replicas polling as fast as answers come, that pass alone would keep a hub of 128
# replicas busy. So each answer waits for the news of at least this long.
FOLLOW_PERIOD_S = 0.02
# Past this many indexed blocks, objects alive after a snapshot is loaded leave the garbage
# collector's generations (`gc.freeze`): a full collection would otherwise walk every entry of
# every replica's block set and of the holder map, about 1.8 s at 8M blocks (0.1 ms frozen),
# stalling every routing decision of the process. The sets stay mutable; a dropped replica's
# set is freed by its reference count as before, and none of them can be in a cycle.
FREEZE_AT_BLOCKS = 1 << 17
# The replicas' running sequences are averaged over about this long: what a conversation
# placed now will find there over its next turns, rather than the moment's count.
DECODE_LOAD_WINDOW_S = 30.0
APPLY_SLICE_S = 0.001  # the longest a hub answer's folding holds the event loop at a time (but for a snapshot)
_followers: dict[str, "KVIndexFollower"] = {}


class KVIndexFollower:
    def __init__(self, app_name: str, block_size: int, clock=time.monotonic, hubs: int = 1):
        """`hubs`: the application's `serving.kv_event_hubs`, each followed on its own."""
        self.app_name = app_name
        self.block_size = block_size
        self.expected_check = hash_check_value(block_size)
        self.index = KVIndex()
        self.stats: dict[str, EngineStats] = {}
        # Per replica, what the scorer reads of it at every decision, worked out once per news.
        self.table = ReplicaTable()
        # Per replica, the `sent_at` of its latest heartbeat and when that arrived here: the
        # scorer counts its own sends after that arrival as not yet in those figures.
        self.latest_heartbeat: dict[str, tuple[float, float]] = {}
        self.decode_load: dict[str, float] = {}  # per replica, its running sequences averaged (see above)
        self.step_costs = StepCostTable()
        # The replicas whose queue orders by priority and holds something: their waiting
        # sequences per priority (EngineStats.waiting_by_priority), for the scorer's tie-break.
        self.queued: dict[str, EngineStats] = {}
        self.rejected: set[str] = set()
        self.departed: set[str] = set()  # replica ids are never reused
        self.clock = clock  # times heartbeats' arrival; see `known`
        self.follower_id = uuid.uuid4().hex
        self.routers = 1  # the hub's followers: the routers that read the same reports
        self.hubs = hubs
        self.relayed_by: dict[str, int] = {}  # per replica, the hub whose answers bring its news
        self._versions = [-1] * hubs  # of each hub's last answer folded in (-1: ask again at once)
        self._tasks: dict[int, asyncio.Task] = {}

    @classmethod
    def for_app(cls, app_name: str, block_size: int, hubs: int = 1) -> "KVIndexFollower":
        follower = _followers.get(app_name)
        if follower is None:
            follower = _followers[app_name] = cls(app_name, block_size, hubs=hubs)
        follower.ensure_running()
        return follower

    def ensure_running(self) -> None:
        for hub in range(self.hubs):
            task = self._tasks.get(hub)
            if task is None or task.done():
                self._tasks[hub] = asyncio.get_running_loop().create_task(self._follow_forever(hub))

    async def _follow_forever(self, hub_number: int) -> None:
        hub = None
        while ray.is_initialized():  # after ray.shutdown() a Ray call would start a new cluster
            try:
                hub = hub or ray.get_actor(hub_name(self.app_name, hub_number), namespace="kvserve")
                asked_at = time.monotonic()
                news = await hub.follow.remote(self.follower_id, self.cursors(hub_number), self._versions[hub_number],
                                               FOLLOW_TIMEOUT_S)
                await self.apply_in_slices(news, hub_number)
                await asyncio.sleep(max(0.0, asked_at + FOLLOW_PERIOD_S - time.monotonic()))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # no hub yet, or it restarted: try again shortly
                logger.debug("KV event hub %d not reachable: %r", hub_number, error)
                hub = None
                await asyncio.sleep(0.5)

    def cursors(self, hub: int = 0) -> dict[str, KVCursor]:
        """Where this follower stands in the events of each replica hub number `hub` relays."""
        relayed_by, latest = self.relayed_by, self.latest_heartbeat
        return {r: KVCursor(s.epoch, s.last_seq, latest[r][0] if r in latest else None)
                for r, s in self.index.replicas.items() if relayed_by.get(r) == hub}

    def known(self, replicas: list[str]) -> list[str]:
        """Those of `replicas` whose cached blocks the index knows now."""
        return [r for r, known in zip(replicas, self.known_mask(replicas).tolist()) if known]

    def known_mask(self, replicas: list[str]) -> np.ndarray:
        """Per replica, whether the index knows its cached blocks now: it holds a state of it,
        and heard from it within SILENCE_S."""
        return self.table.known_until[self.table.rows(replicas)] >= self.clock()

    def positions(self, replicas: list[str]) -> dict[str, int]:
        """Each of `replicas` to its index in the list (read it, never change it)."""
        return self.table.positions(replicas)

    def figures(self, replicas: list[str]) -> np.ndarray:
        """Per replica, a row of `replica_table`'s columns (zeros for one not heard of yet)."""
        return self.table.counts[self.table.rows(replicas)]

    def apply(self, news: HubNews, hub: int = 0) -> None:
        """Fold one answer of hub number `hub` into the index."""
        for _ in self._applying(news, hub):
            pass

    async def apply_in_slices(self, news: HubNews, hub: int = 0) -> None:
        """`apply`, handing the event loop back every `APPLY_SLICE_S`: the ingress's requests
        and routing decisions wait behind it (on this loop, or on another thread for the
        interpreter lock), and at hundreds of replicas one answer takes several milliseconds
        to fold in."""
        start = time.perf_counter()
        for _ in self._applying(news, hub):
            if time.perf_counter() - start >= APPLY_SLICE_S:
                await asyncio.sleep(0)
                start = time.perf_counter()

    def _applying(self, news: HubNews, hub: int) -> Iterator[None]:
        """`apply`, pausing after each replica whose news changed anything. A replica whose
        news is the heartbeat already taken, with no batch and no snapshot, is passed over:
        folding it in again would change nothing (the hub sends every replica's latest
        heartbeat with every answer). A replica this hub relayed and no longer names is gone."""
        self._versions[hub] = news.version
        self.routers = news.followers
        now = self.clock()
        for gone in [r for r, by in self.relayed_by.items() if by == hub and r not in news.relayed]:
            self.forget(gone)
        for replica, replica_news in news.replicas.items():
            if replica in self.departed or self._heard_already(replica, replica_news):
                continue
            self.relayed_by[replica] = hub
            self._note_heartbeat(replica, replica_news.heartbeat, now)
            self.stats[replica] = replica_news.heartbeat.stats
            if self._agrees(replica, replica_news):
                self._apply_replica(replica, replica_news, now)
            self._figure(replica)
            yield
        loaded = any(replica_news.snapshot is not None for replica_news in news.replicas.values())
        if loaded and len(self.index.holders) >= FREEZE_AT_BLOCKS:
            gc.freeze()

    def _heard_already(self, replica: str, news: ReplicaNews) -> bool:
        latest = self.latest_heartbeat.get(replica)
        return (latest is not None and latest[0] == news.heartbeat.sent_at and not news.batches
                and news.snapshot is None)

    def _note_heartbeat(self, replica: str, heartbeat: Heartbeat, now: float) -> None:
        latest = self.latest_heartbeat.get(replica)
        if latest is None or latest[0] != heartbeat.sent_at:  # the hub passes the latest one on with every answer
            self.latest_heartbeat[replica] = (heartbeat.sent_at, now)
            running = heartbeat.stats.running
            if latest is None:  # `decode_load` is set and dropped with `latest_heartbeat`
                self.decode_load[replica] = float(running)
            else:
                weight = 1 - math.exp(-max(heartbeat.sent_at - latest[0], 0.0) / DECODE_LOAD_WINDOW_S)
                self.decode_load[replica] += weight * (running - self.decode_load[replica])

    def decode_dispersion(self) -> float:
        """How unevenly the replicas' averaged running sequences spread: their variance over
        their mean, about 1 or less where conversations fall on replicas at random, more
        where some replicas keep many more than others."""
        loads = np.fromiter(self.decode_load.values(), float, len(self.decode_load))
        mean = loads.mean() if len(loads) else 0.0
        return float(loads.var() / mean) if mean > 0 else 0.0

    def reported_at(self, replica: str) -> float:
        """When the latest heartbeat of `replica` arrived here (-inf: none has)."""
        latest = self.latest_heartbeat.get(replica)
        return latest[1] if latest is not None else -np.inf

    def _figure(self, replica: str) -> None:
        stats = self.stats[replica]
        state = self.index.replicas.get(replica)
        cached = len(state.blocks) if state is not None else 0
        used = stats.kv_blocks_used
        counts = (stats.running + stats.waiting, max(cached, used), used, stats.kv_blocks_total, stats.queued_tokens,
                  stats.running, stats.working_set_blocks)
        self.table.write(replica, counts, state.heard_at + SILENCE_S if state is not None else -np.inf)
        cost = stats.step_cost
        if cost is not None:
            self.step_costs.write(replica, (cost.base_s, cost.per_prefill_token_s, cost.per_decode_seq_s,
                                            cost.tokens_per_step))
        else:
            self.step_costs.drop(replica)
        if stats.waiting_by_priority:
            self.queued[replica] = stats
        else:
            self.queued.pop(replica, None)

    def _apply_replica(self, replica: str, news: ReplicaNews, now: float) -> None:
        if news.snapshot is not None:
            self.index.load_snapshot(replica, news.block_size, news.snapshot, news.heartbeat, now)
            metrics.KV_SNAPSHOTS.inc()
        elif not self._apply_batches(replica, news):
            return
        if not self.index.hear(replica, news.heartbeat, now):
            self._lose(replica, "heartbeat")

    def _apply_batches(self, replica: str, news: ReplicaNews) -> bool:
        for batch in news.batches:
            fate = self.index.apply(replica, batch)
            if fate is Fate.GAP:
                self._lose(replica, "gap")
                return False
            if fate is Fate.FENCED:
                metrics.KV_FENCED_BATCHES.inc()
            elif fate is Fate.APPLIED:
                metrics.KV_EVENT_LAG.observe(max(0.0, time.time() - batch.ts))
        return True

    def deployment_step_cost(self) -> tuple[float, float, float, float] | None:
        """The step cost of the deployment's replicas (base, per prompt token, per decoding
        sequence, tokens per step): the median of those they measured, which no single
        replica's noisy fit can swing (they run one model on the same hardware); None before
        any has measured."""
        return self.step_costs.median()

    def _lose(self, replica: str, cause: str) -> None:
        """Unknown until a snapshot arrives; the hub is asked for one at once."""
        self.index.drop_replica(replica)
        self._versions[self.relayed_by.get(replica, 0)] = -1
        metrics.REPLICAS_LOST.labels(cause).inc()

    def _agrees(self, replica: str, news: ReplicaNews) -> bool:
        if news.block_size == self.block_size and news.hash_check == self.expected_check:
            return True
        if replica not in self.rejected:
            logger.error(
                "replica %s hashes blocks differently (block size %s, check %s; ours %s, %s): "
                "it gets no prefix-aware routing", replica, news.block_size, news.hash_check,
                self.block_size, self.expected_check,
            )
            self.rejected.add(replica)
        return False

    def forget(self, replica: str, departed: bool = False) -> None:
        if departed:
            self.departed.add(replica)
        self.index.drop_replica(replica)
        self.stats.pop(replica, None)
        self.table.drop(replica)
        self.latest_heartbeat.pop(replica, None)
        self.decode_load.pop(replica, None)
        self.step_costs.drop(replica)
        self.queued.pop(replica, None)
        self.rejected.discard(replica)
        self.relayed_by.pop(replica, None)
