"""The engine: requests in, one scheduled forward pass per step, outputs back."""

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from transformers import AutoTokenizer

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kvserve.workers.engine.kv_cache_manager import KVCacheManager, blocks_for, check_pool_holds_a_sequence
from kvserve.workers.engine.kv_events import BlockSnapshot, KVEventBatch
from kvserve.workers.engine.executor import ModelExecutor, SampleRequest, SamplerOutput
from kvserve.workers.engine.block_hash import BlockHash
from kvserve.workers.engine.outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprobs
from kvserve.workers.engine.prompt_checks import prompt_length_problem
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.workers.engine.sequence import FinishReason, Sequence


@dataclass
class _Sample:
    """One sequence of a request and the text made of it so far."""

    seq: Sequence
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    samples: list[_Sample]

    def to_output(self) -> RequestOutput:
        first = self.samples[0].seq
        return RequestOutput(
            self.request_id,
            self.prompt,
            first.prompt_token_ids,
            [s.output for s in self.samples],
            first.num_cached_prompt_tokens,
        )


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelExecutor):
        self.config = config
        self.runner = runner
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir, local_files_only=True)
        model_config = self.runner.model_config
        self.max_model_len = config.effective_max_model_len(model_config)
        self.kv = KVCacheManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        check_pool_holds_a_sequence(self.kv.num_blocks, config.block_size, self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
            self.kv,
        )
        self.eos_token_ids = self._eos_token_ids(model_config.eos_token_ids)
        self.vocab_size = model_config.vocab_size
        self.requests: dict[str, _Request] = {}

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
    ) -> None:
        """Queue a request; raises ValueError, changing nothing, if it can never be served.
        `block_hashes`, the prompt's block chain if the caller computed it with this engine's
        block size and salt, saves hashing it again."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if text is not None else list(prompt)
        self._check_prompt(token_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = [
            Sequence(request_id, i, token_ids, params, arrival, priority, cache_salt)
            for i in range(params.n)
        ]
        if block_hashes:
            seqs[0].block_hashes = list(block_hashes)
        seqs[0].forks = seqs[1:]
        self.requests[request_id] = _Request(request_id, text, [self._new_sample(s) for s in seqs])
        self.scheduler.add(seqs[0])

    def _check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        problem = prompt_length_problem(len(token_ids), self.max_model_len)
        if problem is not None:
            raise ValueError(problem)
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        size = self.config.block_size
        per_sample = blocks_for(min(len(token_ids) + params.max_tokens, self.max_model_len), size)
        shared = len(token_ids) // size  # full prompt blocks, shared by the samples
        needed = per_sample + (params.n - 1) * (per_sample - shared)
        if needed > self.kv.num_blocks:
            raise ValueError(
                f"the request needs up to {needed} KV blocks but the pool has only "
                f"{self.kv.num_blocks}: shorten the prompt or max_tokens"
            )

    def _new_sample(self, seq: Sequence) -> _Sample:
        params = seq.params
        return _Sample(
            seq,
            CompletionOutput(index=seq.sample_index, logprobs=[] if params.logprobs is not None else None),
            IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens),
            StopStringMatcher(params.stop, params.include_stop_str_in_output),
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; its blocks are free when this returns."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for sample in request.samples:
            if not sample.seq.is_finished:
                self.scheduler.finish(sample.seq, FinishReason.ABORT)
                sample.output.finish_reason = FinishReason.ABORT.value
        return request.to_output()

    # -- stepping ------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one forward pass; return the requests it changed (finished ones for the last time)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        samples = self._sample_requests(batch)
        sampled = self.runner.execute(batch, self.kv.block_tables, samples, self.eos_token_ids)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
        for parent in {id(s.seq): s.seq for s in samples if s.seq.forks}.values():
            self.scheduler.fork_samples(parent)
        changed = self._append_tokens(samples, sampled)
        return [self._emit(r) for r in changed]

    @staticmethod
    def _sample_requests(batch) -> list[SampleRequest]:
        """Sequences whose new tokens reach their end sample; a prompt with forks samples for
        every one of them from the same logits."""
        samples = []
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.num_computed_tokens + num_new == seq.num_tokens:
                samples.append(SampleRequest(i, seq))
                samples.extend(SampleRequest(i, child) for child in seq.forks)
        return samples

    def _append_tokens(self, samples: list[SampleRequest], sampled: SamplerOutput) -> list[_Request]:
        changed: dict[str, _Request] = {}
        for row, request in enumerate(samples):
            seq = request.seq
            state = self.requests[seq.request_id]
            sample = state.samples[seq.sample_index]
            self._append_token(sample, sampled, row)
            changed[seq.request_id] = state
        return list(changed.values())

    def _append_token(self, sample: _Sample, sampled: SamplerOutput, row: int) -> None:
        seq, out = sample.seq, sample.output
        token = sampled.token_ids[row]
        seq.token_ids.append(token)
        out.token_ids.append(token)
        out.delta_token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(TokenLogprobs(token, sampled.logprobs[row], sampled.top_logprobs[row]))
        reason, stop = self._token_stop(seq, token)
        piece = sample.detokenizer.step(token)
        if reason is not None:
            piece += sample.detokenizer.flush()
        text, stopped, stop_str = sample.stop_matcher.feed(piece)
        out.delta_text += text
        if stopped:
            reason, stop = FinishReason.STOP, stop_str
        elif reason is not None:
            out.delta_text += sample.stop_matcher.flush()
        if reason is not None:
            self.scheduler.finish(seq, reason)
            out.finish_reason = reason.value
            out.stop_reason = stop

    def _token_stop(self, seq: Sequence, token: int) -> tuple[FinishReason | None, int | None]:
        params = seq.params
        if token in params.stop_token_ids:
            return FinishReason.STOP, token
        if token in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP, None
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _emit(self, request: _Request) -> RequestOutput:
        """Fold this step's deltas into the texts, snapshot the request, reset the deltas."""
        for sample in request.samples:
            sample.output.text += sample.output.delta_text
        output = request.to_output()
        output.outputs = [
            CompletionOutput(**{**vars(s.output), "token_ids": list(s.output.token_ids)})
            for s in request.samples
        ]
        for sample in request.samples:
            sample.output.delta_text = ""
            sample.output.delta_token_ids = []
        if output.finished:
            del self.requests[request.request_id]
        return output

    # -- state for the serving layer -----------------------------------------------------

    def shutdown(self) -> None:
        """Stop the worker actors and free their placement group, if the model runs on them."""
        self.runner.shutdown()

    def take_kv_events(self) -> KVEventBatch | None:
        return self.kv.take_events()

    def cached_blocks(self) -> BlockSnapshot:
        """The blocks cached as of the last KV event batch taken."""
        return self.kv.snapshot()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.kv.num_blocks,
            kv_blocks_used=self.kv.num_blocks - self.kv.num_free_blocks,
            kv_blocks_cached=self.kv.num_cached_blocks,
            num_preemptions=self.scheduler.num_preemptions,
        )
