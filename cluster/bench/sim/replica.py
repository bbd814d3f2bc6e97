"""One simulated replica: our real Scheduler and KVCacheManager, with the forward pass
replaced by the step-time model.

A step is what `LLMEngine.step` does minus the model: `schedule()`, then, when the step's
time has passed, advance every scheduled sequence's computed tokens and give each one whose
tokens are all computed its next token (the request's answer, token by token), finishing it
with `Scheduler.finish` at its output length. After each step the replica takes its KV
events and publishes them with a heartbeat (`EventStream`), as `LLMServer` does, and a
heartbeat alone once `HEARTBEAT_PERIOD_S` has passed without one.
"""

import operator
from collections.abc import Iterator
from dataclasses import dataclass

from kvserve.cluster.bench.sim.prompts import prompt_tokens, segment_tokens
from kvserve.cluster.bench.sim.relay import EventStream
from kvserve.cluster.bench.sim.step_time import step_counts
from kvserve.cluster.bench.sim.workloads import WorkItem
from kvserve.workers.engine.block_hash import BlockHash
from kvserve.workers.engine.kv_cache_manager import KVCacheManager, blocks_for
from kvserve.workers.engine.prompt_checks import prompt_length_problem
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from kvserve.workers.engine.sequence import FinishReason, Sequence
from kvserve.workers.engine.step_costs import StepCostFit
from kvserve.workers.protocol import HEARTBEAT_PERIOD_S, EngineStats, Heartbeat

_COMPUTED = operator.attrgetter("num_computed_tokens")
_PROMPT = operator.attrgetter("num_prompt_tokens")
_PARAMS = SamplingParams()  # the scheduler never reads them; the output length is the job's


@dataclass(slots=True, eq=False)
class Job:
    """One request on its way through the simulated cluster, and what became of it."""

    index: int
    item: WorkItem
    block_hashes: list[BlockHash]
    router: int
    arrival_s: float  # the item's, or later: when the answer it follows arrived (`WorkItem.after`)
    replica: int = -1
    first_token_s: float | None = None
    finish_s: float | None = None
    cached_tokens: int = 0
    refused: str | None = None
    decision_s: float | None = None  # the wall time of its router's last ranking for it
    reply_tokens: Iterator[int] | None = None  # the answer's tokens not yet emitted
    last_position: int = 0  # the position whose computing ends the request


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings that shape scheduling (EngineConfig's fields of the same names)."""

    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_queue_wait_s: float | None = None


class SimReplica:
    def __init__(self, name: str, limits: EngineLimits, step_time, clock, publish: bool = True):
        """`clock`: the simulated time, read by calling it."""
        self.name = name
        self.limits = limits
        self.step_time = step_time
        self.kv = KVCacheManager(limits.num_blocks, limits.block_size, enable_prefix_caching=True)
        self.scheduler = Scheduler(SchedulerConfig(limits.max_num_seqs, limits.max_num_batched_tokens,
                                                   max_queue_wait_s=limits.max_queue_wait_s), self.kv, clock)
        self.step_costs = StepCostFit(limits.max_num_batched_tokens)  # as the engine fits its steps
        self.jobs: dict[Sequence, Job] = {}  # by the object: no read of its id's string
        self.batch: ScheduledBatch | None = None
        self.event_seq = 0  # of the last batch taken
        self.stream = EventStream(name, limits.block_size, self.kv.snapshot(), self._heartbeat(0.0)) if publish else None

    @property
    def busy(self) -> bool:
        return self.batch is not None

    def refusal(self, item: WorkItem) -> str | None:
        """Why the engine would refuse this request outright (LLMEngine._check_prompt's rules)."""
        problem = prompt_length_problem(item.input_length, self.limits.max_model_len)
        if problem is not None:
            return problem
        total = min(item.input_length + item.output_length, self.limits.max_model_len)
        if blocks_for(total, self.limits.block_size) > self.limits.num_blocks:
            return "more KV blocks than the pool has"
        return None

    def overload(self, now: float) -> str | None:
        """Why the engine would refuse a request arriving `now` for its load (`max_queue_wait_s`), or None."""
        return self.scheduler.overload(now)

    def add(self, job: Job, now: float) -> None:
        """Queue the request; its prompt's block hashes are the ingress's, as the engine adopts them."""
        seq = Sequence(f"req-{job.index}", 0, prompt_tokens(job.item.segments), _PARAMS, now)
        seq.block_hashes = list(job.block_hashes)
        job.reply_tokens = iter(segment_tokens(job.item.reply, job.item.output_length))
        job.last_position = seq.num_prompt_tokens + job.item.output_length - 1
        self.jobs[seq] = job
        self.scheduler.add(seq)

    def start_step(self, now: float) -> float | None:
        """Schedule the next step; when it ends, or None if there is nothing to run."""
        batch = self.scheduler.schedule()
        if batch.is_empty and batch.num_preempted:  # everything was preempted: admit again
            batch = self.scheduler.schedule()
        if batch.is_empty:
            if self.scheduler.running or self.scheduler.waiting:
                raise RuntimeError(f"{self.name}: the scheduler has work but scheduled nothing")
            return None
        self.batch = batch
        duration = self._duration(batch)
        self.step_costs.observe_batch(batch.num_new_tokens, duration)
        if self.stream is not None:
            self.stream.stepping(now, now + duration)
        return now + duration

    def _duration(self, batch: ScheduledBatch) -> float:
        seqs, num_new_tokens = batch.seqs, batch.num_new_tokens
        if num_new_tokens.count(1) == len(seqs) and all(map(operator.ge, map(_COMPUTED, seqs), map(_PROMPT, seqs))):
            context = sum(map(_COMPUTED, seqs))  # decodes only, most steps: without step_counts' loop
            return self.step_time(0, len(seqs), context, context + len(seqs))
        return self.step_time(*step_counts(seqs, num_new_tokens))

    def end_step(self, now: float) -> tuple[list[Job], list[Job]]:
        """Finish the step in flight: (jobs that got their first token, jobs that finished).
        The hot loop of the simulator, so it reads `token_ids` rather than the properties."""
        batch, self.batch = self.batch, None
        first, finished, jobs = [], [], self.jobs
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            computed = seq.num_computed_tokens + num_new
            seq.num_computed_tokens = computed
            tokens = seq.token_ids
            if computed < len(tokens):
                continue
            job = jobs[seq]
            if job.first_token_s is None:
                job.first_token_s, job.cached_tokens = now, seq.num_cached_prompt_tokens
                first.append(job)
            tokens.append(next(job.reply_tokens))
            if computed >= job.last_position:
                self.scheduler.finish(seq, FinishReason.LENGTH)
                del jobs[seq]
                job.finish_s, job.reply_tokens = now, None
                finished.append(job)
        self._publish(now)
        return first, finished

    def _publish(self, now: float) -> None:
        events = self.kv.take_events()
        if self.stream is None:
            return
        if events is None and now - self.stream.last_published < HEARTBEAT_PERIOD_S:
            return
        if events is not None:
            self.event_seq = events.seq
        self.stream.publish(now, events, self._heartbeat(now))

    def _heartbeat(self, now: float) -> Heartbeat:
        return Heartbeat(self.kv.epoch, self.event_seq, now, self.stats())

    def stats(self) -> EngineStats:
        """What LLMEngine.stats() reports."""
        kv, scheduler = self.kv, self.scheduler
        return EngineStats(len(scheduler.running), len(scheduler.waiting), kv.num_blocks,
                           kv.num_blocks - kv.num_free_blocks, kv.num_cached_blocks, scheduler.num_preemptions, None, None,
                           None, (), (), scheduler.queued_tokens(), self.step_costs.model(),
                           scheduler.asked_blocks.count())
