"""The engine: requests in, one scheduled forward pass per step, tokens and outputs back."""

import math
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from transformers import AutoTokenizer

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.kv_cache_manager import KVCacheManager, blocks_for, check_pool_holds_a_sequence
from kvserve.workers.engine.kv_events import BlockSnapshot, KVEventBatch
from kvserve.workers.engine.executor import NO_TOKEN, ModelExecutor, PendingSample, SampleRequest, StepRequest
from kvserve.workers.engine.guided_decoding import GuidedDecoding
from kvserve.workers.engine.bad_words import bad_word_token_ids
from kvserve.workers.engine.block_hash import BlockHash
from kvserve.workers.engine.output_processor import NewToken, OutputProcessor, SampleKey
from kvserve.workers.engine.outputs import (
    EmbeddingOutput, EngineStats, HostTierStats, RequestOutput, TokenLogprobs, count_priorities,
)
from kvserve.workers.engine.pooling import PooledPrompt
from kvserve.workers.engine.prompt_checks import Overloaded, prompt_length_problem
from kvserve.workers.engine.retention import KVRetention, with_prefix_retention
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from kvserve.workers.engine.sequence import PENDING_TOKEN, FinishReason, Sequence
from kvserve.workers.engine.speculative.speculation import DraftModel, Speculation, speculates
from kvserve.workers.engine.step_clock import StepClock
from kvserve.workers.engine.step_costs import StepCostFit
from kvserve.workers.models.gguf_checkpoint import tokenizer_args
from kvserve.workers.engine.structured_output import StructuredMatcher
from kvserve.workers.engine.structured_spec import StructuredOutputError

# An embedding request is one prompt that never samples: one token of room past it, no more.
EMBEDDING_PARAMS = SamplingParams(max_tokens=1)


@dataclass
class _InFlight:
    """A launched step: its samples, where each one's pending token sits, its device result,
    and the prompts it scores with the position each chunk starts at."""

    samples: list[SampleRequest]
    indices: list[int]
    pending: PendingSample
    scored: list[tuple[Sequence, int]]


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelExecutor, draft_model: DraftModel | None = None):
        self.config = config
        self.runner = runner
        self.tokenizer = AutoTokenizer.from_pretrained(**tokenizer_args(config.tokenizer_dir), local_files_only=True)
        model_config = self.runner.model_config
        self.max_model_len = config.effective_max_model_len(model_config)
        self.kv = KVCacheManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                 self.runner.num_host_kv_blocks if config.kv_offload_gib else 0)
        check_pool_holds_a_sequence(self.kv.num_blocks, config.block_size, self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.scheduling_policy,
                            config.max_loras if config.enable_lora else None, config.max_queue_wait_s),
            self.kv,
        )
        self.eos_token_ids = self._eos_token_ids(model_config.eos_token_ids)
        self.vocab_size = model_config.vocab_size
        self.requests: dict[str, list[Sequence]] = {}  # the samples of every unfinished request
        self.outputs: OutputProcessor | None = OutputProcessor(self.tokenizer)
        self.clock: StepClock | None = None  # set by `kvserve bench overhead` only
        self.step_costs = StepCostFit(config.max_num_batched_tokens)
        self.overlaps_steps = config.overlaps_steps
        self._in_flight: _InFlight | None = None  # the step launched last, not read yet
        self._repeat_seqs: list[Sequence] | None = None  # see `_sample_requests`
        self._repeat_samples: list[SampleRequest] = []
        self._requests_reading_tokens = 0  # whose sampling reads their tokens so far (`reads_tokens`)
        self.speculation = Speculation(config.speculative, draft_model) if config.speculative else None
        self._requests_speculating = 0
        self.guided = GuidedDecoding(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._refusals: list[tuple[str, str]] = []  # (request id, why) of requests dropped after add_request
        self._failures: list[tuple[str, str]] = []  # (request id, why) of requests the model failed midway
        self._pooling_requests = 0
        self._scoring_requests = 0  # unfinished requests that asked for prompt logprobs
        self._embeddings: list[EmbeddingOutput] = []
        self.lora_folders = dict(config.lora_modules)  # the adapters served now: startup's and run time's

    def _eos_token_ids(self, from_model: Seq[int]) -> tuple[int, ...]:
        ids = set(from_model)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    # -- requests in ---------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        block_hashes: list[BlockHash] | None = None,
        kv_retention: KVRetention | None = None,
        pooled: PooledPrompt | None = None,
        lora_name: str | None = None,
    ) -> None:
        """Queue a request; raises ValueError, changing nothing, if it can never be served
        (`Overloaded`, a ValueError, if it cannot be now: `max_queue_wait_s`).
        `block_hashes`, the prompt's block chain if the caller computed it with this engine's
        block size, salt and LoRA adapter, saves hashing it again. With `pooled` the prompt is
        embedded instead (`add_embedding_request`). `lora_name` runs it under that adapter of
        `lora_modules`."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_lora_name(lora_name)
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if text is not None else list(prompt)
        banned = bad_word_token_ids(self.tokenizer, params.bad_words) if params.bad_words else ()
        self._check_prompt(token_ids, params, banned)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        overloaded = self.scheduler.overload(arrival, priority)
        if overloaded is not None:
            raise Overloaded(overloaded)
        retention = with_prefix_retention(kv_retention, token_ids, self.config.kv_retention_prefixes)
        seqs = [
            Sequence(request_id, i, token_ids, params, arrival, priority, cache_salt, self.max_model_len,
                     frozenset(() if params.ignore_eos else self.eos_token_ids), retention, lora_name)
            for i in range(params.n)
        ]
        if block_hashes:
            seqs[0].block_hashes = list(block_hashes)
        seqs[0].forks = seqs[1:]
        if banned:
            for seq in seqs:
                seq.bad_word_ids = banned
        self.requests[request_id] = seqs
        if params.reads_tokens:
            self._requests_reading_tokens += 1
        if self.speculation is not None and speculates(params):
            self._requests_speculating += 1
        if params.prompt_logprobs is not None:
            seqs[0].prompt_logprobs = [None] * len(token_ids)
            self._scoring_requests += 1
        if pooled is not None:
            seqs[0].pooled = pooled
            self._pooling_requests += 1
        elif self.outputs is not None:
            self.outputs.add_request(request_id, text, token_ids, params)
        if params.structured is None:
            self.scheduler.add(seqs[0])
        else:  # scheduled once its grammar is compiled, off this thread
            self.guided.add(request_id, params.structured)

    def add_embedding_request(
        self,
        request_id: str,
        prompt: str | list[int],
        priority: int = 0,
        cache_salt: str | None = None,
        block_hashes: list[BlockHash] | None = None,
        kv_retention: KVRetention | None = None,
    ) -> None:
        """Queue a prompt to embed: prefilled like any other, through the same scheduler and
        prefix cache, pooled chunk by chunk, never decoded; `take_embeddings` hands its vector
        over once its last chunk is computed, and its blocks are free then."""
        self.add_request(request_id, prompt, EMBEDDING_PARAMS, priority, cache_salt, block_hashes=block_hashes,
                         kv_retention=kv_retention, pooled=PooledPrompt(self.config.pooling))

    def take_embeddings(self) -> list[EmbeddingOutput]:
        """The embedding requests finished since the last call."""
        embeddings, self._embeddings = self._embeddings, []
        return embeddings

    def _schedule_compiled(self) -> None:
        """Queue the requests whose grammar is ready, each sample with its own matcher; refuse
        those whose grammar failed to compile."""
        for request_id, compiled in self.guided.take_compiled():
            seqs = self.requests[request_id]
            if isinstance(compiled, StructuredOutputError):
                for seq in seqs:
                    self.scheduler.finish(seq, FinishReason.ABORT)
                self._forget(request_id)
                self._refusals.append((request_id, str(compiled)))
                continue
            for seq in seqs:
                seq.matcher = StructuredMatcher.for_spec(compiled, seq.params.structured)
            self.scheduler.add(seqs[0])

    def take_refusals(self) -> list[tuple[str, str]]:
        """The requests dropped since the last call for a problem of their own found after
        `add_request` returned (a grammar that does not compile), with the reason."""
        refusals, self._refusals = self._refusals, []
        return refusals

    def take_failures(self) -> list[tuple[str, str]]:
        """The requests ended since the last call because the model gave one of their samples
        nothing to draw its next token from (NO_TOKEN), with the reason; the rest of the
        batch goes on."""
        failures, self._failures = self._failures, []
        return failures

    def _check_lora_name(self, lora_name: str | None) -> None:
        if lora_name is None or lora_name in self.lora_folders:
            return
        if not self.config.enable_lora:
            raise ValueError(f"LoRA adapter {lora_name!r} asked for, but this engine serves none (enable_lora)")
        raise ValueError(f"unknown LoRA adapter {lora_name!r}; lora_modules has {', '.join(self.lora_folders) or 'none'}")

    def add_lora(self, name: str, folder: str) -> None:
        """Serve LoRA adapter `name` from `folder` (checked as at startup: ValueError); a new
        folder for a served name replaces it once no request runs under it."""
        if self.lora_folders.get(name) == folder:
            return
        if not self.config.enable_lora:
            raise ValueError(f"LoRA adapter {name!r} asked for, but this engine serves none (enable_lora)")
        self._refuse_if_in_use(name, "replaced")
        self.runner.add_lora(name, folder)
        if name in self.lora_folders:
            self.kv.forget_adapter(name)  # computed under the weights being replaced
        self.lora_folders[name] = folder

    def remove_lora(self, name: str) -> None:
        """Stop serving LoRA adapter `name`; refused (ValueError) while a request runs under it,
        so unloading never cuts a request short."""
        self._refuse_if_in_use(name, "removed")
        if self.lora_folders.pop(name, None) is not None:
            self.runner.remove_lora(name)
            self.kv.forget_adapter(name)  # the name may come back with other weights

    def _refuse_if_in_use(self, name: str, change: str) -> None:
        in_use = sum(1 for seqs in self.requests.values() if seqs[0].lora_name == name)
        if in_use:
            raise ValueError(f"LoRA adapter {name!r} cannot be {change} while {in_use} requests run under it")

    def _check_in_vocabulary(self, whose: str, **token_ids: int | None) -> None:
        for name, token_id in token_ids.items():
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{whose} {name} {token_id} is outside the vocabulary (size {self.vocab_size})")

    def _check_generable(self, params: SamplingParams, banned: tuple[tuple[int, ...], ...]) -> None:
        """Refuse a request whose settings leave no token to generate at some step (`banned`:
        its bad words' token sequences), or name tokens outside the vocabulary."""
        structured, budget = params.structured, params.thinking_budget
        if structured is not None:
            self._check_in_vocabulary("the structured output's", after_token_id=structured.after_token_id,
                                      opened_by_token_id=structured.opened_by_token_id)
        if budget is not None:
            self._check_in_vocabulary("the thinking budget's", end_token_id=budget.end_token_id,
                                      opened_by_token_id=budget.opened_by_token_id)
        allowed = params.allowed_token_ids
        if allowed is not None and max(allowed) >= self.vocab_size:
            raise ValueError(f"allowed_token_ids holds {max(allowed)}, outside the vocabulary (size {self.vocab_size})")
        held_back = set()
        if params.min_tokens:
            held_back = {t for t in (*self.eos_token_ids, *params.stop_token_ids) if 0 <= t < self.vocab_size}
        if len(held_back) == self.vocab_size:
            raise ValueError("min_tokens holds back the end tokens and stop_token_ids until reached, and together "
                             "they are the whole vocabulary: nothing would be left to generate")
        if held_back and allowed is not None and held_back.issuperset(allowed):
            raise ValueError("min_tokens holds back the end tokens and stop_token_ids until reached, and they "
                             "hold every one of allowed_token_ids: nothing would be left to generate")
        if len(held_back | {ids[0] for ids in banned if len(ids) == 1}) >= self.vocab_size:
            raise ValueError("bad_words ban every token that min_tokens does not hold back: nothing would be "
                             "left to generate")

    def _check_prompt(self, token_ids: list[int], params: SamplingParams, banned: tuple[tuple[int, ...], ...]) -> None:
        problem = prompt_length_problem(len(token_ids), self.max_model_len)
        if problem is not None:
            raise ValueError(problem)
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        self._check_generable(params, banned)
        size = self.config.block_size
        per_sample = blocks_for(min(len(token_ids) + params.max_tokens, self.max_model_len), size)
        shared = len(token_ids) // size  # full prompt blocks, shared by the samples
        needed = per_sample + (params.n - 1) * (per_sample - shared)
        if needed > self.kv.num_blocks:
            raise ValueError(
                f"the request needs up to {needed} KV blocks but the pool has only "
                f"{self.kv.num_blocks}: shorten the prompt or max_tokens"
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; its blocks are free when this returns. Its last
        output, when this engine processes its own outputs."""
        seqs = self.requests.get(request_id)
        if seqs is None:
            return None
        for seq in seqs:
            self.scheduler.finish(seq, FinishReason.ABORT)
        self._forget(request_id)
        return self.outputs.abort(request_id) if self.outputs is not None else None

    def detach_outputs(self) -> OutputProcessor:
        """Hand output processing to the caller, who runs it off the step loop: from now on it
        registers each request with the returned processor, feeds it what `step_tokens`
        returns, and passes the samples it stops to `stop_samples`. `step` is gone."""
        self.outputs = None
        return OutputProcessor(self.tokenizer, snapshots=False)

    # -- stepping ------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one forward pass; return the requests it changed (finished ones for the last time)."""
        if self.outputs is None:
            raise RuntimeError("this engine's outputs are processed elsewhere: call step_tokens")
        outputs, stopped = self.outputs.process(self.step_tokens())
        for request_id, reason in self.take_refusals():
            self.outputs.abort(request_id)
            raise ValueError(f"request {request_id!r} refused: {reason}")
        failures = self.take_failures()
        if failures:
            raise RuntimeError("; ".join(f"request {request_id!r} failed: {reason}" for request_id, reason in failures))
        self.stop_samples(stopped)
        if self.clock is not None:
            self.clock.lap("detokenize")
        return outputs

    def step_tokens(self) -> list[NewToken]:
        """Run one forward pass; return the token each sampling sequence got. Stop tokens, EOS
        and length end sequences here; stop strings are the output processor's.

        With async scheduling the step is launched and the tokens returned are those of the
        step before it, read while this one runs; a step whose samples use penalties or bad
        words (which read the tokens so far) waits for that step first."""
        started = time.perf_counter()
        if self.guided.num_compiling:
            self._schedule_compiled()
        earlier = [] if self._can_overlap() else self._take_in_flight()
        speculating = self._requests_speculating > 0
        if speculating:
            self.speculation.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if self.clock is not None:
            self.clock.lap("schedule")
        if batch.is_empty:
            return earlier + self._take_in_flight()
        if speculating:
            self.speculation.draft(batch, self.kv.block_tables)
        samples = self._verify_requests(batch) if speculating else self._sample_requests(batch)
        pooled = [i for i, seq in enumerate(batch.seqs) if seq.pooled is not None] if self._pooling_requests else []
        scored = self._prompts_scored(batch) if self._scoring_requests else []
        step = StepRequest(batch, self.kv.block_tables, samples, self.eos_token_ids,
                           self.guided.token_masks(samples) if self.guided.num_requests else None, pooled,
                           speculating, scored)
        if self.overlaps_steps and self._can_overlap():
            tokens = earlier + self._launch(step)
            self._observe_step(batch, started)
            return tokens
        scored_chunks = self._scored_chunks(step)
        sampled = self.runner.execute(step)
        if scored_chunks:
            self._take_prompt_logprobs(scored_chunks, sampled.prompt_logprobs)
        self._advance(batch, samples)
        if pooled:
            self._take_pooled([batch.seqs[i] for i in pooled], sampled.pooled)
        if speculating:
            tokens = self._take_verified(samples, sampled) if samples else []
        else:
            tokens = self._take_samples(samples, sampled) if samples else []
        if self.clock is not None:
            self.clock.lap("outputs")
        self._observe_step(batch, started)
        return earlier + tokens

    def _observe_step(self, batch: ScheduledBatch, started: float) -> None:
        """Fit the step's time, `started` to now: with async scheduling it is the wait for the
        step before, which is how long a step takes once the device is the bottleneck."""
        self.step_costs.observe_batch(batch.num_new_tokens, time.perf_counter() - started)

    def _can_overlap(self) -> bool:
        """Whether the next step may be planned before this one's tokens are read: not while a
        request's sampling reads its tokens so far (penalties, bad words) or its grammar needs
        the last one."""
        return (self._requests_reading_tokens == 0 and self.guided.num_requests == 0 and self._pooling_requests == 0
                and self._requests_speculating == 0)

    @staticmethod
    def _prompts_scored(batch: ScheduledBatch) -> list[int]:
        """The batch indices of prompts whose logprobs are wanted, where this step computes a
        position that predicts one of their tokens."""
        return [i for i, seq in enumerate(batch.seqs)
                if seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens - 1]

    @staticmethod
    def _scored_chunks(step: StepRequest) -> list[tuple[Sequence, int]]:
        """The prompts the step scores, each with the position its chunk starts at."""
        return [(step.batch.seqs[i], step.batch.seqs[i].num_computed_tokens) for i in step.prompt_scored]

    @staticmethod
    def _take_prompt_logprobs(scored: list[tuple[Sequence, int]], chunks: list[list[TokenLogprobs]]) -> None:
        """Put each chunk's scores in place (position `start` predicts token `start` + 1): a
        prompt computed again after a preemption overwrites its own."""
        for (seq, start), chunk in zip(scored, chunks):
            if seq.prompt_logprobs is not None:
                seq.prompt_logprobs[start + 1 : start + 1 + len(chunk)] = chunk

    def _take_pooled(self, seqs: list[Sequence], rows) -> None:
        """Pool each embedding prompt's chunk of this step; those whose prompt is done end here."""
        for seq, row in zip(seqs, rows):
            seq.pooled.add(row)
            if seq.num_computed_tokens == seq.num_tokens:
                vector = seq.pooled.vector(seq.num_tokens, self.config.normalize_embeddings)
                if not all(map(math.isfinite, vector)):
                    self._failures.append((seq.request_id, "the model's hidden states for this prompt hold NaN or "
                                                           "infinite values: it has no embedding"))
                    self.abort_request(seq.request_id)
                    continue
                self._embeddings.append(
                    EmbeddingOutput(seq.request_id, vector, seq.num_tokens, seq.num_cached_prompt_tokens))
                self._finish(seq, FinishReason.STOP)

    def _launch(self, step: StepRequest) -> list[NewToken]:
        """Queue this step with a pending token per sample, then read the step before it."""
        previous = self._in_flight
        pending = self.runner.launch(step, previous.pending if previous else None)
        batch, samples = step.batch, step.samples
        scored = self._scored_chunks(step)
        self._advance(batch, samples)
        for row, request in enumerate(samples):
            seq = request.seq
            seq.token_ids.append(PENDING_TOKEN)
            seq.num_pending += 1
            seq.sample_row = row
            seq.last_token_pending = len(seq.token_ids) >= seq.max_num_tokens
        self._in_flight = _InFlight(samples, [len(s.seq.token_ids) - 1 for s in samples], pending, scored)
        return self._read(previous) if previous else []

    def _take_in_flight(self) -> list[NewToken]:
        in_flight, self._in_flight = self._in_flight, None
        return self._read(in_flight) if in_flight else []

    def _read(self, in_flight: "_InFlight") -> list[NewToken]:
        """Wait for a launched step and put its tokens in place of the pending ones; those of
        sequences that ended meanwhile (by an earlier token, a stop string, an abort) are dropped."""
        sampled = in_flight.pending.result()
        if self.clock is not None:
            self.clock.lap("forward")
        if in_flight.scored:
            self._take_prompt_logprobs(in_flight.scored, sampled.prompt_logprobs)
        tokens = []
        for request, index, token, logprob, top in zip(in_flight.samples, in_flight.indices, sampled.token_ids,
                                                       sampled.logprobs, sampled.top_logprobs):
            seq = request.seq
            seq.token_ids[index] = token
            seq.num_pending -= 1
            if not seq.is_finished and (new := self._take_sampled(seq, token, logprob, top, index + 1)):
                tokens.append(new)
        if self.clock is not None:
            self.clock.lap("outputs")
        return tokens

    def _advance(self, batch: ScheduledBatch, samples: list[SampleRequest]) -> None:
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
        for parent in {id(s.seq): s.seq for s in samples if s.seq.forks}.values():
            self.scheduler.fork_samples(parent)

    def stop_samples(self, samples: list[SampleKey]) -> None:
        """End the samples whose output a stop string ended; finished or unknown ones are skipped."""
        for request_id, index in samples:
            seqs = self.requests.get(request_id)
            if seqs is not None and not seqs[index].is_finished:
                self._finish(seqs[index], FinishReason.STOP)

    def _sample_requests(self, batch) -> list[SampleRequest]:
        """Sequences whose new tokens reach their end sample; a prompt with forks samples for
        every one of them from the same logits. When the last batch's sequences all decoded and
        sampled, one each, and decode again, they sample again: the same list is handed back, which
        tells the runner that the step's rows are those of the last."""
        decodes_only = batch.num_new_tokens.count(1) == len(batch.seqs)
        if decodes_only and batch.seqs == self._repeat_seqs:
            return self._repeat_samples
        samples, one_each = [], decodes_only
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.num_computed_tokens + num_new == len(seq.token_ids) and seq.pooled is None:
                samples.append(SampleRequest(i, seq))
                if seq.forks:
                    samples += [SampleRequest(i, child) for child in seq.forks]
                    one_each = False
            else:
                one_each = False
        self._repeat_seqs, self._repeat_samples = (batch.seqs, samples) if one_each else (None, [])
        return samples

    @staticmethod
    def _verify_requests(batch) -> list[SampleRequest]:
        """`_sample_requests` of a step whose sequences may verify proposed tokens, scheduled
        after their own."""
        samples = []
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.num_computed_tokens + num_new - len(seq.draft_token_ids) == len(seq.token_ids) and seq.pooled is None:
                samples.append(SampleRequest(i, seq))
                if seq.forks:
                    samples += [SampleRequest(i, child) for child in seq.forks]
        return samples

    def _take_samples(self, samples: list[SampleRequest], sampled) -> list[NewToken]:
        """Each sample's new token (none for those a sibling sample's failure ended)."""
        tokens = []
        for request, token, logprob, top in zip(samples, sampled.token_ids, sampled.logprobs, sampled.top_logprobs):
            if not request.seq.is_finished and (new := self._take_sampled(request.seq, token, logprob, top, None)):
                tokens.append(new)
        return tokens

    def _take_verified(self, samples: list[SampleRequest], sampled) -> list[NewToken]:
        """Each sample's tokens from its rows: the proposed tokens the target agrees with, then
        the target's own. The computed tokens and blocks of the rest are rolled back."""
        tokens, row = [], 0
        for request in samples:
            seq, drafts = request.seq, request.seq.draft_token_ids
            targets = sampled.token_ids[row : row + len(drafts) + 1]
            accepted = self.speculation.num_accepted(drafts, targets) if drafts else 0
            for j in range(accepted + 1):
                if seq.is_finished:  # by an earlier token, or a sibling sample's failure
                    break
                new = self._take_sampled(seq, targets[j], sampled.logprobs[row + j], sampled.top_logprobs[row + j], None)
                if new:
                    tokens.append(new)
            if drafts:
                seq.draft_token_ids, seq.draft_probs = [], None
                if not seq.is_finished:
                    self.scheduler.roll_back(seq, len(drafts) - accepted)
            row += len(targets)
        return tokens

    def _take_sampled(self, seq: Sequence, token: int, logprob, top, num_tokens: int | None) -> NewToken | None:
        """`_take_token`, unless the model gave `seq` nothing to draw from: then its request
        ends as failed (`take_failures`) and None."""
        if token != NO_TOKEN:
            return self._take_token(seq, token, logprob, top, num_tokens)
        position = (len(seq.token_ids) + 1 if num_tokens is None else num_tokens) - seq.num_prompt_tokens
        self._failures.append((seq.request_id, f"the model's logits for output token {position} of sample "
                               f"{seq.sample_index} hold NaN or no finite value: nothing to draw from"))
        self.abort_request(seq.request_id)
        return None

    def _take_token(self, seq: Sequence, token: int, logprob, top, num_tokens: int | None) -> NewToken:
        """`token` is `seq`'s newest token (appended here when `num_tokens` is None, else already
        in place as token number `num_tokens`): end `seq` if it stops it."""
        if num_tokens is None:
            seq.token_ids.append(token)
            num_tokens = len(seq.token_ids)
        reason = stop = None
        if token in seq.ending_token_ids or num_tokens >= seq.max_num_tokens or seq.matcher is not None:
            reason, stop = self._token_stop(seq, token, num_tokens)
            if reason is not None:
                self._finish(seq, reason)
        prompt_logprobs = None
        if seq.prompt_logprobs is not None:  # its first token: the prompt is scored in full
            prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        return NewToken(seq.request_id, seq.sample_index, token, logprob, top, reason, stop,
                        seq.num_cached_prompt_tokens, prompt_logprobs)

    def _token_stop(self, seq: Sequence, token: int, num_tokens: int) -> tuple[FinishReason | None, int | None]:
        """Whether `token` ends `seq` (and the stop token that did): one of its ending tokens,
        its length, or the end of its grammar, whose matcher takes the token here."""
        params = seq.params
        if seq.matcher is not None:
            if not seq.matcher.accept(token):
                raise RuntimeError(f"token {token} of request {seq.request_id!r} is outside its grammar's mask")
            if seq.matcher.is_terminated():
                return FinishReason.STOP, token if token in params.stop_token_ids else None
        if token in params.stop_token_ids:
            return FinishReason.STOP, token
        if token in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP, None
        if num_tokens >= seq.max_num_tokens:
            return FinishReason.LENGTH, None
        return None, None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End one sample; the request is done when all of its samples are."""
        self.scheduler.finish(seq, reason)
        seqs = self.requests[seq.request_id]
        if all(s.is_finished for s in seqs):
            self._forget(seq.request_id)

    def _forget(self, request_id: str) -> None:
        seqs = self.requests.pop(request_id)
        if seqs[0].params.reads_tokens:
            self._requests_reading_tokens -= 1
        if self.speculation is not None and speculates(seqs[0].params):
            self._requests_speculating -= 1
        if seqs[0].params.structured is not None:
            self.guided.forget(request_id)
        if seqs[0].pooled is not None:
            self._pooling_requests -= 1
        if seqs[0].params.prompt_logprobs is not None:
            self._scoring_requests -= 1
        if not self.requests:
            self._in_flight = None  # only the tokens of ended sequences can be in it

    # -- state for the serving layer -----------------------------------------------------

    def shutdown(self) -> None:
        """Stop the worker actors and free their placement group, if the model runs on them;
        and the grammar compiler's thread."""
        self.runner.shutdown()
        self.guided.shutdown()

    def take_kv_events(self) -> KVEventBatch | None:
        return self.kv.take_events()

    def cached_blocks(self) -> BlockSnapshot:
        """The blocks cached as of the last KV event batch taken."""
        return self.kv.snapshot()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + self.guided.num_compiling,
            kv_blocks_total=self.kv.num_blocks,
            kv_blocks_used=self.kv.num_blocks - self.kv.num_free_blocks,
            kv_blocks_cached=self.kv.num_cached_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            grammars=self.guided.timings_so_far(),
            speculative=self.speculation.stats() if self.speculation is not None else None,
            host_tier=self._host_tier_stats(),
            waiting_by_priority=self._waiting_by_priority(),
            lora_adapters=self.runner.resident_loras() if self.config.enable_lora else (),
            queued_tokens=self.scheduler.queued_tokens(),
            step_cost=self.step_costs.model(),
            working_set_blocks=self.scheduler.asked_blocks.count(),
        )

    def _waiting_by_priority(self) -> tuple[tuple[int, int], ...]:
        if self.config.scheduling_policy != "priority":
            return ()
        return count_priorities(seq.priority for seq in self.scheduler.waiting)

    def _host_tier_stats(self) -> HostTierStats | None:
        host = self.kv.host
        if host is None:
            return None
        copies = self.runner.host_tier  # the tier is refused unless the model runs in this process
        return HostTierStats(host.num_blocks, len(host.cached), self.kv.num_host_hit_blocks, self.kv.num_loaded_blocks,
                             self.kv.num_offloaded_blocks, copies.bytes_in, copies.bytes_out)
