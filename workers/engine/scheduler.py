"""Iteration-level scheduling: which sequences run in the next forward pass, and how far."""

import bisect
import operator
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvserve.workers.engine.kv_cache_manager import BlockTransfer, KVCacheManager
from kvserve.workers.engine.sequence import FinishReason, Sequence, SequenceStatus
from kvserve.workers.engine.working_set import RecentBlocks


SCHEDULING_POLICIES = ("fcfs", "priority")
_TOKEN_IDS = operator.attrgetter("token_ids")
_NUM_COMPUTED = operator.attrgetter("num_computed_tokens")


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    policy: str = "fcfs"  # one of SCHEDULING_POLICIES
    max_loras: int | None = None  # LoRA adapters among the running sequences at most; None: no adapters
    max_queue_wait_s: float | None = None  # newcomers expected to wait longer are refused (`overload`)


def arrival_order(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival, seq.sample_index)


def priority_order(seq: Sequence) -> tuple[int, float, int]:
    return (seq.priority, seq.arrival, seq.sample_index)


@dataclass
class ScheduledBatch:
    """One step's plan. Decodes (one new token) come first, then prompt chunks."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Copies between the device and the host tier, before `block_copies` and the forward pass.
    kv_transfers: list[BlockTransfer] = field(default_factory=list)
    num_preempted: int = 0
    # Sequences whose blocks were freed (finished or preempted) since the last batch: an
    # executor that keeps block tables between steps drops theirs.
    departed: list[str] = field(default_factory=list)
    # Sequences whose block tables gained blocks since the last batch (the others' are unchanged).
    grown: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Continuous batching with chunked prefill, in arrival order (`fcfs`) or by priority (a
    lower value first, then arrival).

    Running sequences are served before waiting ones are admitted. When blocks run out, the
    running sequence that would run last (the worst priority, the latest arrival among equals)
    is preempted: never one that runs before the sequence needing the room. Its blocks are
    freed and it goes back into the queue in its place, to be recomputed (with the help of the
    prefix cache) later.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, clock: Callable[[], float] = time.monotonic):
        """`clock`: the one sequences' `arrival` is read on."""
        if config.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy {config.policy!r} is not one of {', '.join(SCHEDULING_POLICIES)}")
        self.config = config
        self.kv = kv
        self.order = priority_order if config.policy == "priority" else arrival_order
        self.waiting: deque[Sequence] = deque()  # sorted by self.order
        self.running: list[Sequence] = []  # sorted by self.order
        self.pending_copies: list[tuple[int, int]] = []
        # Per waiting sequence, its tokens not in the prefix cache when it arrived: what it will compute.
        self.waiting_tokens: dict[str, int] = {}
        self.departed: list[str] = []
        self.num_preemptions = 0
        self.clock = clock
        self._starts: deque[float] = deque()  # when sequences left the queue, within the last max_queue_wait_s
        self._queued_since = 0.0  # when the queue last went from empty to not (with max_queue_wait_s)
        self.asked_blocks = RecentBlocks(2 * kv.num_blocks, clock=clock)  # the working set, reported to routers

    def add(self, seq: Sequence) -> None:
        if not self.waiting and self.config.max_queue_wait_s is not None:
            self._queued_since = self.clock()
        self.waiting_tokens[seq.seq_id] = seq.num_tokens - len(self.kv.get_computed_blocks(seq)) * self.kv.block_size
        self.asked_blocks.ask(seq.block_hashes)
        key = self.order(seq)
        if not self.waiting or self.order(self.waiting[-1]) <= key:
            self.waiting.append(seq)
            return
        self.waiting.insert(bisect.bisect_right(self.waiting, key, key=self.order), seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(block_copies=self.pending_copies, departed=self.departed)
        self.pending_copies = []
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if batch.num_preempted == 0:
            self._admit_waiting(batch, budget)
        self._put_decodes_first(batch)
        if not batch.is_empty:  # an empty batch reaches no executor: its departures wait for the next
            self.departed = []
            batch.kv_transfers = self.kv.take_transfers()
            batch.grown = self.kv.take_grown()
        return batch

    def queued_tokens(self) -> int:
        """Tokens the running and waiting sequences have still to compute (a waiting one's past
        the prefix it found cached when it arrived)."""
        running = self.running
        return (sum(self.waiting_tokens.values()) + sum(map(len, map(_TOKEN_IDS, running)))
                - sum(map(_NUM_COMPUTED, running)))

    def overload(self, now: float, priority: int = 0) -> str | None:
        """Why a request of `priority` arriving `now` is refused for load under
        `max_queue_wait_s`, or None: it would wait longer than that for its first step. So it
        would where a request it queues behind has waited longer already (past saturation the
        newcomer waits about as long), or where the requests ahead of it take longer than that
        at the pace the queue started sequences lately (in the last `max_queue_wait_s`, or
        since the queue formed if later: a queue that grows faster than it drains is caught
        before its oldest request has waited long, and a burst on an idle replica is not)."""
        limit = self.config.max_queue_wait_s
        if limit is None or not self.waiting:
            return None
        self._forget_starts_before(now - limit)
        observed = min(limit, now - self._queued_since)
        if self.longest_wait(now, priority) <= limit and (
                not self._starts or self._ahead(priority) * observed <= limit * len(self._starts)):
            return None
        return (f"the server is overloaded: requests wait on this replica longer than max_queue_wait_s "
                f"({limit:g} s) for their first step; retry after a moment")

    def _ahead(self, priority: int) -> int:
        """The waiting sequences a new request of `priority` would queue behind."""
        if self.order is arrival_order:
            return len(self.waiting)
        return sum(1 for seq in self.waiting if seq.priority <= priority)

    def _note_start(self) -> None:
        now = self.clock()
        self._starts.append(now)
        self._forget_starts_before(now - self.config.max_queue_wait_s)

    def _forget_starts_before(self, horizon: float) -> None:
        starts = self._starts
        while starts and starts[0] < horizon:
            starts.popleft()

    def longest_wait(self, now: float, priority: int = 0) -> float:
        """How long the waiting request that has waited longest for its first step has waited
        by `now`, among those a new request of `priority` would queue behind (every one under
        fcfs); 0 if none. Sequences preempted back into the queue ran before: how long they
        wait again says little of a newcomer's wait."""
        if self.order is arrival_order:  # the queue is in arrival order: the first fresh one
            oldest = next((seq.arrival for seq in self.waiting if not seq.num_preemptions), now)
        else:
            oldest = min((seq.arrival for seq in self.waiting if not seq.num_preemptions and seq.priority <= priority),
                         default=now)
        return max(now - oldest, 0.0)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        running, allocate = self.running, self.kv.allocate_slots
        seqs, counts = batch.seqs, batch.num_new_tokens
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            i += 1
            if seq.last_token_pending:  # it ends when that token comes back: no step past its limit
                continue
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if seq.draft_token_ids:
                num_new += self._fit_drafts(seq, num_new, budget)
            # The quiet check is `allocate_slots`' own first one, made here to save the call
            # for the decodes of every step.
            if (seq.num_computed_tokens + num_new >= seq.kv_quiet_below and not allocate(seq, num_new)
                    and not self._make_room(seq, num_new, batch)):
                return budget
            seqs.append(seq)
            counts.append(num_new)
            budget -= num_new
        return budget

    def _make_room(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Preempt the running sequences that would run last until `seq`'s new tokens fit;
        False when `seq` itself had to go."""
        while True:
            victim = self.running[-1]
            self._preempt(victim)
            batch.num_preempted += 1
            if victim is seq:
                return False
            if self.kv.allocate_slots(seq, num_new):
                return True

    def _fit_drafts(self, seq: Sequence, num_new: int, budget: int) -> int:
        """How many of `seq`'s proposed tokens this step verifies: those the token budget and
        the free blocks leave room for; never a preemption for their sake. Trims the rest."""
        drafts = seq.draft_token_ids[: budget - num_new]
        if drafts and not self.kv.allocate_slots(seq, num_new + len(drafts)):
            drafts = []
        seq.draft_token_ids = drafts
        return len(drafts)

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._adapter_fits(seq):
                break
            hits = self.kv.get_computed_blocks(seq)
            num_cached = len(hits) * self.kv.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(seq, num_new, hits):
                break
            self.waiting.popleft()
            del self.waiting_tokens[seq.seq_id]
            if self.config.max_queue_wait_s is not None:
                self._note_start()
            seq.num_computed_tokens = num_cached
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=self.order)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _adapter_fits(self, seq: Sequence) -> bool:
        """Whether running `seq` keeps the running sequences' LoRA adapters within the device's
        slots (a step's adapters must all be resident). Until one frees, the queue waits."""
        if seq.lora_name is None or self.config.max_loras is None:
            return True
        adapters = {s.lora_name for s in self.running} - {None}
        return seq.lora_name in adapters or len(adapters) < self.config.max_loras

    @staticmethod
    def _put_decodes_first(batch: ScheduledBatch) -> None:
        if batch.num_new_tokens.count(1) == len(batch.num_new_tokens):
            return
        pairs = sorted(zip(batch.seqs, batch.num_new_tokens), key=lambda p: p[1] != 1)
        batch.seqs = [s for s, _ in pairs]
        batch.num_new_tokens = [n for _, n in pairs]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        self.departed.append(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.num_draft_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def fork_samples(self, parent: Sequence) -> None:
        """Start the other samples of `parent`'s request, sharing its prompt blocks. A sample
        that finds no block for its copy of a partial last block queues to recompute instead."""
        children = parent.forks
        parent.forks = []
        for child in children:
            if not self.kv.can_fork(parent):
                self.add(child)
                continue
            copy = self.kv.fork(parent, child)
            if copy is not None:
                self.pending_copies.append(copy)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
            child.status = SequenceStatus.RUNNING
            bisect.insort(self.running, child, key=self.order)

    def roll_back(self, seq: Sequence, num_rejected: int) -> None:
        """Uncompute the last `num_rejected` computed tokens of `seq` (proposed tokens the
        target did not keep) and return the blocks past its tokens. A shrunk block table counts
        as a departure: executors keep tables on the premise that they only grow."""
        seq.num_computed_tokens -= num_rejected
        if self.kv.trim(seq, seq.num_tokens):
            self.departed.append(seq.seq_id)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` wherever it is and free its blocks at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            del self.waiting_tokens[seq.seq_id]
        self.kv.free(seq)
        self.departed.append(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
