"""The scheduler under random arrivals, steps and aborts, with both policies: the queues stay in
policy order, admission takes the head of the queue, preemption takes the running
sequences that would run last, never one that runs before the sequence needing the room, and
the longest wait a newcomer would queue behind is the plain maximum."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvserve.workers.engine.kv_cache_manager import KVCacheManager, blocks_for
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.scheduler import Scheduler, SchedulerConfig, arrival_order, priority_order
from kvserve.workers.engine.sequence import FinishReason, Sequence, SequenceStatus

BLOCK = 4


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        policy=st.sampled_from(["fcfs", "priority"]),
        num_blocks=st.integers(5, 16),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(4, 24),
    )
    def setup(self, policy, num_blocks, max_num_seqs, budget):
        self.kv = KVCacheManager(num_blocks, BLOCK)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget, policy), self.kv)
        self.order = priority_order if policy == "priority" else arrival_order
        self.live: dict[str, Sequence] = {}
        self.arrivals = 0

    @rule(
        prompt=st.lists(st.integers(0, 7), min_size=1, max_size=12),
        max_tokens=st.integers(1, 6),
        priority=st.integers(0, 3),
    )
    def add(self, prompt, max_tokens, priority):
        if blocks_for(len(prompt) + max_tokens, BLOCK) > self.kv.num_blocks:
            return
        self.arrivals += 1
        seq = Sequence(f"r{self.arrivals}", 0, prompt, SamplingParams(max_tokens=max_tokens),
                       arrival=float(self.arrivals), priority=priority)
        self.live[seq.seq_id] = seq
        self.scheduler.add(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        seq = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.scheduler.finish(seq, FinishReason.ABORT)

    @precondition(lambda self: self.live)
    @rule()
    def step(self):
        running_before = list(self.scheduler.running)
        waiting_before = list(self.scheduler.waiting)
        batch = self.scheduler.schedule()
        if not self.scheduler.running and self.scheduler.waiting:
            assert batch.num_preempted, "an idle scheduler admits the head of its queue"
        preempted = [s for s in running_before if s.status is SequenceStatus.WAITING]
        assert len(preempted) == batch.num_preempted
        assert preempted == running_before[len(running_before) - len(preempted):]
        for victim in preempted:
            assert all(self.order(victim) > self.order(s) for s in batch.seqs)
        admitted = sorted((s for s in batch.seqs if s in waiting_before), key=self.order)
        assert admitted == waiting_before[: len(admitted)]
        assert not (admitted and preempted)
        self._run(batch)

    def _run(self, batch):
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(0)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.scheduler.finish(seq, FinishReason.LENGTH)
                    del self.live[seq.seq_id]

    @invariant()
    def queues_are_in_policy_order(self):
        for queue in (list(self.scheduler.waiting), self.scheduler.running):
            keys = [self.order(s) for s in queue]
            assert keys == sorted(keys)
        assert len(self.scheduler.running) <= self.scheduler.config.max_num_seqs

    @invariant()
    def every_live_sequence_is_in_one_queue(self):
        queued = [s.seq_id for s in self.scheduler.waiting] + [s.seq_id for s in self.scheduler.running]
        assert sorted(queued) == sorted(self.live)

    @invariant()
    def the_longest_wait_is_the_oldest_fresh_waiting_request_a_newcomer_queues_behind(self):
        now = self.arrivals + 0.5
        for priority in range(4):
            behind = [now - s.arrival for s in self.scheduler.waiting if s.num_preemptions == 0
                      and (self.order is arrival_order or s.priority <= priority)]
            assert self.scheduler.longest_wait(now, priority) == max(behind, default=0.0)

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        for _ in range(200):
            if not self.live:
                break
            self._run(self.scheduler.schedule())
        assert not self.live, "every request finishes"
        assert self.kv.num_free_blocks == self.kv.num_blocks


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)


def _queue(policy: str) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(1, 64, policy), KVCacheManager(8, BLOCK))
    for i, priority in enumerate([5, 0, 5, 0]):
        scheduler.add(Sequence(f"r{i}", 0, [1, 2], SamplingParams(), arrival=float(i), priority=priority))
    return scheduler


def test_priority_policy_orders_by_priority_then_arrival_and_fcfs_ignores_it():
    assert [s.request_id for s in _queue("priority").waiting] == ["r1", "r3", "r0", "r2"]
    assert [s.request_id for s in _queue("fcfs").waiting] == ["r0", "r1", "r2", "r3"]


def test_a_newcomer_is_refused_while_it_would_wait_longer_than_max_queue_wait_s():
    """One sequence runs at a time. A request is refused where the requests ahead of it would
    take longer than max_queue_wait_s at the pace the queue starts them, or where one it
    queues behind has waited longer than that; a burst on an idle replica is taken whole."""
    now = [0.0]
    scheduler = Scheduler(SchedulerConfig(1, 64, max_queue_wait_s=1.0), KVCacheManager(64, BLOCK), lambda: now[0])
    arrivals = iter(range(100))

    def arrive(at: float) -> str | None:
        now[0] = at
        problem = scheduler.overload(at)
        if problem is None:
            scheduler.add(Sequence(f"r{next(arrivals)}", 0, [1, 2], SamplingParams(max_tokens=50), arrival=at))
        return problem

    assert [arrive(0.0), arrive(0.0), arrive(0.0)] == [None] * 3  # nothing started yet: no pace to judge by
    scheduler.schedule()  # the first starts
    assert arrive(0.1) is None  # two ahead, one start in the 0.1 s since the queue formed: 0.2 s
    assert "max_queue_wait_s (1 s)" in arrive(0.6)  # three ahead at one start in 0.6 s: 1.8 s
    assert arrive(1.5) is not None  # no start in the last second, and the oldest has waited 1.5 s
    for seq in list(scheduler.running):
        scheduler.finish(seq, FinishReason.ABORT)
    now[0] = 1.6
    scheduler.schedule()  # the second starts; two wait, the older for 1.6 s
    assert arrive(1.7) is not None
    while scheduler.waiting or scheduler.running:
        for seq in list(scheduler.running):
            scheduler.finish(seq, FinishReason.ABORT)
        scheduler.schedule()
    assert arrive(5.0) is None  # an empty queue takes anyone
