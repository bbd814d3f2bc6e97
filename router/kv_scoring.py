"""The KV-aware routing decision, free of Serve so that it can be tested and timed alone."""

import random
import threading
import weakref
from collections import defaultdict, deque
from collections.abc import Container
from dataclasses import dataclass
from itertools import takewhile

import numpy as np

from kvserve.router import routing_metrics
from kvserve.router.conversations import ConversationLog
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.options import RouterOptions
from kvserve.router.replica_table import (
    OCCUPIED, QUEUED_TOKENS, REPORTED, RUNNING, TOTAL, USED, WORKING_SET, ReplicaCounter,
)
from kvserve.router.working_sets import WorkingSets
from kvserve.workers.protocol import BlockHash

_NOMINAL_STEP = (0.0, 1.0, 0.0, np.inf)  # before any replica measured its steps: a token a second, no step cost
_SENDS_KEPT = 256  # per replica, the uncached tokens of this router's last sends there


# Per LLM application, the scorers of the `KVAwareRouter`s in this process (those Serve creates
# for the ingress's handles), for the ingress to reach on a refusal. Here, not beside the router:
# Serve ships the router's module by value, with copies of its globals.
# The routers register on their thread, the ingress reads on its own: both under the lock.
_scorers: defaultdict[str, weakref.WeakSet["KVScorer"]] = defaultdict(weakref.WeakSet)
_scorers_lock = threading.Lock()


def register_scorer(app_name: str, scorer: "KVScorer") -> None:
    with _scorers_lock:
        _scorers[app_name].add(scorer)


def forget_refused_send(app_name: str, replica: str, block_hashes: list[BlockHash]) -> None:
    """A replica of application `app_name` refused the request of these blocks: the routers
    of this process that sent it there take the send back (`KVScorer.withdraw`)."""
    with _scorers_lock:
        scorers = list(_scorers.get(app_name, ()))
    for scorer in scorers:
        scorer.withdraw(replica, block_hashes)


@dataclass(eq=False)  # one router's state: equal only to itself (kept in weak sets by identity)
class KVScorer:
    """With `options.cost_unit` "tokens" (`_seconds` says what "seconds" does):
    cost(replica) = prompt tokens it would compute (a block in its host-memory tier counts
                       as `options.host_block_credit` computed: it comes back by a copy)
                     + `options.load_cost_tokens` x requests in flight there
                     + `options.lora_load_cost_tokens` if the request's LoRA adapter is not
                       in one of its device slots (as its last heartbeat reported them)
                     + the tokens of its new blocks x the share of its pool that recent
                       traffic keeps wanted (the cached work those blocks push out, now or
                       as the conversations there grow).
    The last term places new prefixes by the replicas' working sets (`WorkingSets`), not by
    their momentary load nor by blocks that sit cached but unwanted: the live prefixes spread
    over the cluster's whole cache, and a prefix every replica could use (a system prompt)
    does not pull every new conversation onto its first holder. Equal costs go to the
    replica with the most free room in its pool. A replica busier than the least busy one by
    more than `imbalance_slack` requests is held back to the end of the ranking, whatever it
    caches: that stops a hot prefix from piling every request onto its holder.

    Between replicas of equal cost, the request goes where it would wait behind the fewest
    waiting requests of its priority or a better one (as replicas that schedule by priority
    report them), then where fewer requests are in flight, then to the most free room."""

    follower: KVIndexFollower
    block_size: int
    options: RouterOptions = RouterOptions()

    def __post_init__(self):
        self.in_flight = ReplicaCounter()  # this router's requests in flight on each replica
        self.working_sets = WorkingSets(self.options.working_set_window_s)
        self.conversations = ConversationLog(self.options.working_set_window_s)
        # Per replica, the LoRA adapters this router sent it and when: resident there for
        # `recent_s`, until the replica's heartbeat names it.
        self.sent_adapters: dict[str, dict[str, float]] = defaultdict(dict)
        # Per replica, when this router sent it requests and their uncached prompt tokens,
        # newest last: the queue a heartbeat has not reported yet (`cost_unit: seconds`).
        self.sent_tokens: dict[str, deque[tuple[float, float]]] = defaultdict(lambda: deque(maxlen=_SENDS_KEPT))
        # The replicas sent to since their latest heartbeat, perhaps: per replica, the arrival
        # of the heartbeat it was last counted against (None: count again) and the sends since.
        self._unheard: dict[str, tuple[float | None, int]] = {}
        self._last_uncached: tuple[list[str], np.ndarray] | None = None  # of the last ranking, for `record`
        self._ties = np.random.default_rng(random.getrandbits(64))  # seeded by `random`, as the simulator needs
        self._refused: deque[tuple[str, list[BlockHash]]] = deque()  # sends refused, from the ingress's thread

    def record(self, replica: str, block_hashes: list[BlockHash], lora_name: str | None = None) -> None:
        """The request with these blocks (under LoRA adapter `lora_name`) goes to `replica`."""
        if self._last_uncached is not None:
            ranked, uncached = self._last_uncached
            position = self.follower.positions(ranked).get(replica)
            if position is not None:
                self._note_send(replica, float(uncached[position]))
        if self.options.decode_steps_ahead or self.options.seed_idle_replicas:
            self.conversations.sent(self.follower.clock(), block_hashes)
        stats = self.follower.stats.get(replica)
        self.working_sets.add(replica, block_hashes, limit=2 * stats.kv_blocks_total if stats else None)
        if lora_name is not None:
            self.sent_adapters[replica][lora_name] = self.working_sets.clock()

    def _note_send(self, replica: str, uncached: float) -> None:
        now, sends = self.follower.clock(), self.sent_tokens[replica]
        sends.append((now, uncached))
        heard_at, count = self._unheard.get(replica, (None, 0))
        if heard_at is not None and now > heard_at:
            self._unheard[replica] = (heard_at, min(count + 1, len(sends)))
        else:
            self._unheard[replica] = (None, 0)

    def withdraw(self, replica: str, block_hashes: list[BlockHash]) -> None:
        """`replica` refused the request of these blocks that we sent it: it caches none of
        them, so a retry is not drawn back there by them, nor do they count in its working set.
        Safe from any thread: the next ranking, on the router's own, takes the send back."""
        self._refused.append((replica, block_hashes))

    def _take_back_refused(self) -> None:
        while self._refused:
            replica, block_hashes = self._refused.popleft()
            self.working_sets.withdraw(replica, block_hashes)
            self.conversations.withdraw(block_hashes)

    def request_sent(self, replica: str) -> None:
        self.in_flight[replica] += 1

    def request_completed(self, replica: str) -> None:
        if self.in_flight[replica] > 0:
            self.in_flight[replica] -= 1

    def forget(self, replica: str) -> None:
        self.in_flight.drop(replica)
        self.working_sets.forget(replica)
        self.sent_adapters.pop(replica, None)
        self.sent_tokens.pop(replica, None)
        self._unheard.pop(replica, None)

    def standings(self, replicas: list[str], figures: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per replica, as arrays, from its `figures` (`KVIndexFollower.figures`) and this
        router's own counts (this runs for every replica at every decision):
        - ours: requests this router has in flight there;
        - reported: the requests running or waiting there, as its last heartbeat counted them
          (the load is the larger of the two: other ingress replicas route to it too);
        - fill: the share of its pool that holds something, cached (exact, from the index)
          or in use;
        - pressure: its working set, or the blocks in use if more, over its pool: above 1 when
          the traffic sent there already wants more than it can cache (up to 2, more where
          retained blocks leave little room). The working set is what this router sent there
          lately; with several routers, each of which sends it only its share, what the
          replica's requests asked for, as its heartbeat counts them, where that is more.
          Blocks kept at a retention priority above the default stay whatever comes: they
          leave both the wanted blocks and the pool, and new blocks compete for the rest.
        A replica the hub has not passed on yet counts our load and an empty pool."""
        n = len(replicas)
        reported, occupied, used, total = (figures[:, c] for c in (REPORTED, OCCUPIED, USED, TOTAL))
        ours = self.in_flight.of(replicas)
        wanted = self.working_sets.sizes(replicas)
        if self.follower.routers > 1:
            wanted = np.maximum(wanted, figures[:, WORKING_SET])
        heard = total > 0
        fills = np.divide(np.minimum(occupied, total), total, out=np.zeros(n), where=heard)
        retained, retained_wanted = self._retained(replicas)
        contested = np.maximum(np.maximum(wanted, used) - retained_wanted, 0)
        room = np.maximum(total - retained, 1)
        pressures = np.divide(contested, room, out=np.zeros(n), where=heard)
        return ours, reported, fills, pressures

    def _retained(self, replicas: list[str]) -> tuple[np.ndarray | int, np.ndarray | int]:
        """Per replica, its device blocks retained above the default priority, and how many of
        them its working set wants (call after `working_sets.sizes`, which expires old sends)."""
        index = self.follower.index
        if not index.with_retained_blocks:  # as on most clusters: none anywhere
            return 0, 0
        retained, wanted = np.zeros(len(replicas), np.int64), np.zeros(len(replicas), np.int64)
        for k in [k for k, r in enumerate(replicas) if r in index.with_retained_blocks]:  # few, if any
            blocks = index.replicas[replicas[k]].retained
            retained[k], wanted[k] = len(blocks), self.working_sets.wanted_among(replicas[k], blocks)
        return retained, wanted

    def rank(self, replicas: list[str], block_hashes: list[BlockHash], num_tokens: int,
             priority: int = 0, lora_name: str | None = None) -> tuple[list[int], str]:
        """Indices of `replicas`, best first, and the reason for the first choice, for a
        request of `priority` (lower is served sooner) under LoRA adapter `lora_name` (None:
        the base model)."""
        self._take_back_refused()
        known = self._known(replicas)
        matched = self.follower.index.prefix_matches(block_hashes, known)
        matched.update(self.working_sets.recent_matches(block_hashes, known, self.options.recent_s, matched))
        depths = self._spread(replicas, matched)
        host_blocks = self._host_blocks(replicas, block_hashes, known, matched, depths)
        figures = self.follower.figures(replicas)
        ours, reported, fills, pressures = self.standings(replicas, figures)
        loads = np.maximum(ours, reported)
        size = self.block_size
        prompt_blocks = -(-num_tokens // size)
        new_blocks = prompt_blocks - depths  # blocks loaded from the host tier take device room too
        saved = (depths + self.options.host_block_credit * host_blocks) * size
        side_tokens = size * new_blocks * pressures + self._lora_load_costs(replicas, lora_name)
        uncached = num_tokens - saved
        if self.options.cost_unit == "tokens":
            costs = uncached + self.options.load_cost_tokens * loads + side_tokens
        else:
            placed = np.full_like(uncached, num_tokens) if self._placed_by_load(depths, num_tokens) else uncached
            later_turns = self._later_turns_of_a_start(block_hashes, matched)
            costs = self._seconds(replicas, figures, placed, side_tokens, ours, self._decode_steps_ahead(later_turns))
            if self._seeds_an_idle_replica(later_turns, matched, depths, figures):
                costs = self._idle_first(replicas, costs, figures, ours, pressures, side_tokens)
            self._last_uncached = (replicas, uncached)
        ahead = self._waiting_ahead(replicas, priority)
        order = self._order(costs, ahead, loads, fills)
        held = loads[order] > self.imbalance_slack(int(loads.min()))
        allowed = order[~held]
        reason = self._reason(int(depths[allowed[0]]), max(matched.values(), default=0), held.any())
        return np.concatenate((allowed, order[held])).tolist(), reason

    def _placed_by_load(self, depths: np.ndarray, num_tokens: int) -> bool:
        """Whether the request is placed as if no replica cached any of its prompt
        (`options.min_cached_share`): one router's alone. With 16 routers the rule lost hit
        rate and time to first token in the simulator (docs/benchmarks.md, seventeenth round)."""
        return (self.follower.routers == 1
                and depths.max() * self.block_size < self.options.min_cached_share * num_tokens)

    def _order(self, costs: np.ndarray, ahead: np.ndarray, loads: np.ndarray, fills: np.ndarray) -> np.ndarray:
        """Indices by cost; equal costs by `ahead`, then `loads`, then `fills`, then at random.
        One sort by cost, then a sort by all keys of only the replicas whose cost another
        shares: they keep the places their costs give them (few, but for an idle cluster)."""
        random_tiebreak = self._ties.random(len(costs))
        order = np.argsort(costs, kind="stable")
        ranked = costs[order]
        tied_next = ranked[1:] == ranked[:-1]
        if tied_next.any():
            tied = np.zeros(len(costs), bool)
            tied[1:] = tied_next
            tied[:-1] |= tied_next
            group = order[tied]
            order[tied] = group[np.lexsort((random_tiebreak[group], fills[group], loads[group], ahead[group],
                                            costs[group]))]
        return order

    def _later_turns_of_a_start(self, block_hashes: list[BlockHash], matched: dict[str, int]) -> float:
        """For a request that starts a conversation, the later turns conversations have had
        lately (`ConversationLog.later_turns`); 0 for any other request, or where neither rule
        that places a conversation's start is on."""
        options = self.options
        if ((not options.decode_steps_ahead and not options.seed_idle_replicas)
                or not self._starts_conversation(matched) or self.conversations.continues(block_hashes)):
            return 0.0
        return self.conversations.later_turns(self.follower.routers)

    def _decode_steps_ahead(self, later_turns: float) -> float:
        """The decode steps of the request to charge against each replica's running sequences:
        `decode_steps_ahead` for a request that starts a conversation, where conversations have
        later turns and the replicas' decoding load has grown uneven; fewer as either fades.
        A conversation stays where it starts, so it is placed for its decoding there as well as
        for its first token; and this spreads the conversations that share a prefix (a tool
        context) beyond the replicas that happen to hold it. Where the load is even already
        (conversations placed by their first token land about at random), the first token alone
        decides: a start sent away from its cached prefix would only be slower. `later_turns`:
        `_later_turns_of_a_start`'s."""
        if not self.options.decode_steps_ahead or not later_turns:
            return 0.0
        uneven = self.follower.decode_dispersion() - 1
        return self.options.decode_steps_ahead * min(max(uneven, 0.0), 1.0) * min(later_turns, 1.0)

    def _seeds_an_idle_replica(self, later_turns: float, matched: dict[str, int], depths: np.ndarray,
                               figures: np.ndarray) -> bool:
        """Whether the request goes first to a replica that caches and runs nothing, if there is
        one (`options.seed_idle_replicas`): where no replica holds any of its prompt, or where it
        starts a conversation, conversations having later turns (`later_turns`:
        `_later_turns_of_a_start`'s), on a prefix that replicas hold (`depths`: their cached
        blocks of it) and every deepest holder has sequences running.
        A prompt no one holds is computed whole anywhere, and an empty idle replica is as quick
        as any; but routers that jitter their costs would as often pick an idle replica that
        holds another prefix, which then takes the later requests of both prefixes while the
        empty one waits for work."""
        if not self.options.seed_idle_replicas:
            return False
        if not matched:
            return True
        if not later_turns:
            return False
        holders = depths == depths.max()
        return bool((figures[holders, RUNNING] > 0).all())

    def _idle_first(self, replicas: list[str], costs: np.ndarray, figures: np.ndarray, ours: np.ndarray,
                    pressures: np.ndarray, side_tokens: np.ndarray | int) -> np.ndarray:
        """`costs` with every spare replica made the cheapest: known, caching nothing, running
        or waiting on nothing (as its heartbeat and our own sends tell), sent nothing by us
        lately (with nothing cached, its pressure is 0 only where its working set is empty),
        and pushing out or loading no more than any other replica would (`side_tokens`: a
        spare replica without the request's LoRA adapter is no spare)."""
        idle = (self.follower.known_mask(replicas) & (figures[:, OCCUPIED] == 0) & (figures[:, REPORTED] == 0)
                & (figures[:, QUEUED_TOKENS] == 0) & (ours == 0) & (figures[:, TOTAL] > 0) & (pressures == 0)
                & (side_tokens <= np.min(side_tokens)))
        if not idle.any():
            return costs
        seeded = costs.copy()
        seeded[idle] = costs.min() - 1.0
        return seeded

    @staticmethod
    def _starts_conversation(matched: dict[str, int]) -> bool:
        """Whether no replica holds more of the prompt (`matched`: its cached blocks on each
        replica that holds some) than every other holder does (a continued conversation's
        history is on the replica that served it)."""
        deepest = max(matched.values(), default=0)
        return deepest == 0 or sum(1 for depth in matched.values() if depth == deepest) > 1

    def _seconds(self, replicas: list[str], figures: np.ndarray, uncached: np.ndarray, side_tokens: np.ndarray,
                 ours: np.ndarray, decode_steps: float) -> np.ndarray:
        """Per replica, the predicted seconds to the request's first token there: the tokens
        queued there (its heartbeat's, plus the uncached tokens of our sends it had not counted
        yet, `_unreported_tokens`) and the request's uncached ones, computed in steps beside
        its running sequences; plus `side_tokens` (the blocks it would push out, loading the
        adapter) at the cost per token; plus what its running sequences add to `decode_steps`
        more steps (the request's own decoding there, where it will stay). The step cost is
        the deployment's (`KVIndexFollower.deployment_step_cost`); before any replica has
        measured, a token counts a second. While requests wait on the replicas, the request's
        own work (`uncached` + `side_tokens`) is charged again `options.waiting_work_charge`
        times their median count of waiting requests. Where several routers read the same
        reports, each time is then raised by up to `options.cost_jitter` of itself, at random:
        otherwise they would all send the same moment's requests to the same replica, each
        unaware of the others'."""
        n = len(replicas)
        reported, queued, running = figures[:, REPORTED], figures[:, QUEUED_TOKENS], figures[:, RUNNING]
        base, per_token, per_decode, tokens_per_step = self.follower.deployment_step_cost() or _NOMINAL_STEP
        prefill = queued + self._unreported_tokens(replicas, np.maximum(ours - reported, 0)) + uncached
        steps = np.maximum(np.ceil(prefill / tokens_per_step), 1)
        seconds = steps * base + (steps + decode_steps) * per_decode * running + per_token * (prefill + side_tokens)
        if self.options.waiting_work_charge:
            charge = self._waiting_work_charge(reported - running)
            if charge:
                seconds += charge * (per_token * (uncached + side_tokens))
        if self.follower.routers > 1 and self.options.cost_jitter:
            seconds *= 1 + self.options.cost_jitter * self._ties.random(n)
        return seconds

    def _waiting_work_charge(self, waiting: np.ndarray) -> float:
        """What a request's prefill costs the requests after it, as a multiple of its own time,
        where the replicas report `waiting` requests not yet scheduled. Once most replicas have
        a queue, work added anywhere takes capacity the cluster lacks and delays about as many later
        requests as wait on a typical replica (the median); a prompt recomputed away from its
        cached prefix for a slightly shorter queue costs them its whole prefill. While most
        replicas have room (median 0) it costs no one else."""
        waiting = np.maximum(waiting, 0)
        if np.count_nonzero(waiting) < len(waiting) - len(waiting) // 2:  # most have no one waiting: the median is 0
            return 0.0
        return self.options.waiting_work_charge * float(np.median(waiting))

    def _unreported_tokens(self, replicas: list[str], in_flight_unreported: np.ndarray) -> np.ndarray:
        """Per replica, the uncached tokens of our latest sends there that its heartbeat has
        not counted: as many as we sent after that heartbeat arrived, or as we have in flight
        there beyond the requests it reported, whichever is more (the heartbeat's count holds
        requests of other routers)."""
        unreported = in_flight_unreported
        since = self._sends_since_heartbeat()
        if since:
            unreported = unreported.copy()
            positions = self.follower.positions(replicas)
            for replica, sent in since.items():
                k = positions.get(replica)
                if k is not None and sent > unreported[k]:
                    unreported[k] = sent
        tokens = np.zeros(len(replicas))
        ks = np.flatnonzero(unreported)
        for k, count in zip(ks.tolist(), unreported[ks].tolist()):
            sends = self.sent_tokens[replicas[k]]
            total = 0
            for newest in range(1, min(count, len(sends)) + 1):
                total += sends[-newest][1]
            tokens[k] = total
        return tokens

    def _sends_since_heartbeat(self) -> dict[str, int]:
        """Per replica we sent to after its latest heartbeat arrived, how many sends: counted
        again only where another heartbeat has arrived since the last count (`_note_send`
        counts the sends after it)."""
        counts = {}
        for replica, (counted_at, count) in list(self._unheard.items()):
            heard_at = self.follower.reported_at(replica)
            if heard_at != counted_at:
                count = sum(1 for _ in takewhile(lambda send: send[0] > heard_at, reversed(self.sent_tokens[replica])))
                self._unheard[replica] = (heard_at, count)
            if count:
                counts[replica] = count
            else:
                del self._unheard[replica]
        return counts

    def _host_blocks(self, replicas: list[str], block_hashes: list[BlockHash], known: Container[str],
                     matched: dict[str, int], depths: np.ndarray) -> np.ndarray | int:
        """Per replica, the prompt's blocks past its device match found in its host tier."""
        on_host = self.follower.index.host_extensions(block_hashes, known, matched)
        if not on_host:
            return 0
        return np.maximum(self._spread(replicas, on_host) - depths, 0)

    def _spread(self, replicas: list[str], counts: dict[str, int]) -> np.ndarray:
        """`counts` of some of `replicas` as an array over all of them (0 for the others)."""
        spread = np.zeros(len(replicas), np.int64)
        positions = self.follower.positions(replicas)
        for replica, count in counts.items():
            spread[positions[replica]] = count
        return spread

    def _lora_load_costs(self, replicas: list[str], lora_name: str | None) -> np.ndarray | int:
        """Per replica, the cost of loading adapter `lora_name` there: none where a device slot
        holds it, or where this router sent it within `recent_s`."""
        if lora_name is None or not self.options.lora_load_cost_tokens:
            return 0
        stats, sent = self.follower.stats, self.sent_adapters
        since = self.working_sets.clock() - self.options.recent_s
        missing = np.fromiter(
            ((r not in stats or lora_name not in stats[r].lora_adapters)
             and (r not in sent or sent[r].get(lora_name, -np.inf) < since) for r in replicas),
            bool, len(replicas))
        return self.options.lora_load_cost_tokens * missing

    def _waiting_ahead(self, replicas: list[str], priority: int) -> np.ndarray:
        """Per replica, the waiting requests a request of `priority` would queue behind there."""
        queued = self.follower.queued
        if not queued:
            return np.zeros(len(replicas), np.int64)
        return np.fromiter((queued[r].waiting_ahead_of(priority) if r in queued else 0 for r in replicas),
                           np.int64, len(replicas))

    def imbalance_slack(self, least: int) -> float:
        """The most requests a replica may have in flight and still rank by its cost: the
        least busy one's plus `max_imbalance` (`seconds_max_imbalance` for a cost in
        seconds, which counts the queue itself and needs only a far looser bound), or plus
        `imbalance_share` of the least busy one's if more. With long requests every replica
        carries many, and Poisson swings of a few requests would otherwise send a prefix away
        from the replica that holds it."""
        options = self.options
        extra = options.max_imbalance if options.cost_unit == "tokens" else options.seconds_max_imbalance
        return least + max(extra, options.imbalance_share * least)

    def _known(self, replicas: list[str]) -> Container[str]:
        """The replicas whose caches we may count on. An unknown one (restarted, lost events,
        silent) is scored as caching nothing, not even what we recently sent it."""
        mask = self.follower.known_mask(replicas)
        if mask.all():
            return self.follower.positions(replicas)
        known = {r for r, known in zip(replicas, mask.tolist()) if known}
        if set(replicas) - known - self.follower.rejected:
            routing_metrics.UNKNOWN_DECISIONS.inc()
        return known

    @staticmethod
    def _reason(best_match: int, top_match: int, held_back: bool) -> str:
        if top_match == 0:
            return "no_cached_prefix"
        if best_match == top_match:
            return "cached_prefix"
        return "load_guard" if held_back else "load_balance"
