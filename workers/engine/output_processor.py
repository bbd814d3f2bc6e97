"""Turns the step loop's sampled tokens into what clients see: text, stop strings, outputs.

The step loop only appends tokens and applies the stops that need no text (stop tokens, EOS,
`max_tokens`, `max_model_len`); it hands each step's tokens over as `NewToken`s. Detokenizing,
matching stop strings and building `RequestOutput`s happen here, either right after the step
(`LLMEngine.step`) or on another thread while the next step runs (the Serve replica). A stop
string found here ends the sample's output at once; the engine is told which samples to stop
and any tokens it made for them in the meantime are dropped.
"""

from dataclasses import dataclass

from kvserve.workers.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kvserve.workers.engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput, TokenLogprobs
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.sequence import FinishReason

SampleKey = tuple[str, int]  # (request id, sample index)


@dataclass(slots=True)
class NewToken:
    """One token the step loop appended to one sample, and whether that ended the sample."""

    request_id: str
    sample_index: int
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: FinishReason | None
    stop_reason: int | None  # the stop token that ended it
    num_cached_tokens: int
    prompt_logprobs: PromptLogprobs | None = None  # with the request's first token, if it asked for them


@dataclass
class _Sample:
    output: CompletionOutput  # cumulative fields kept only for snapshots; the deltas since the last emit
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    delta_logprobs: list[TokenLogprobs] | None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # once they came; without snapshots, until emitted

    @property
    def finished(self) -> bool:
        return all(s.output.finished for s in self.samples)


class OutputProcessor:
    """The text side of every request in flight. `snapshots`: each output carries the whole
    text, token ids and logprobs so far as well as the step's deltas (what `LLMEngine.step`
    returns, as vLLM's engine does; the lists keep growing until the request finishes);
    without it only the deltas and the finish are filled in, which is all a stream needs."""

    def __init__(self, tokenizer, snapshots: bool = True):
        self.tokenizer = tokenizer
        self.snapshots = snapshots
        self.requests: dict[str, _Request] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        samples = [self._new_sample(i, prompt_token_ids, params) for i in range(params.n)]
        self.requests[request_id] = _Request(request_id, prompt, prompt_token_ids, samples)

    def _new_sample(self, index: int, prompt_token_ids: list[int], params: SamplingParams) -> _Sample:
        wants_logprobs = params.logprobs is not None
        return _Sample(
            CompletionOutput(index=index, logprobs=[] if wants_logprobs and self.snapshots else None),
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
            StopStringMatcher(params.stop, params.include_stop_str_in_output),
            [] if wants_logprobs else None,
        )

    def process(self, tokens: list[NewToken]) -> tuple[list[RequestOutput], list[SampleKey]]:
        """One step's tokens -> the outputs of the requests they changed (finished ones for the
        last time), and the samples that a stop string ended here, for the engine to stop.
        Tokens of requests aborted or samples already ended are dropped."""
        changed: dict[str, _Request] = {}
        stopped: list[SampleKey] = []
        for new in tokens:
            request = self.requests.get(new.request_id)
            if request is None:
                continue
            sample = request.samples[new.sample_index]
            if sample.output.finished:
                continue
            request.num_cached_tokens = new.num_cached_tokens
            if new.prompt_logprobs is not None:
                request.prompt_logprobs = new.prompt_logprobs
            if self._append(sample, new) and new.finish_reason is None:
                stopped.append((new.request_id, new.sample_index))
            changed[new.request_id] = request
        return [self._emit(request) for request in changed.values()], stopped

    @staticmethod
    def _append(sample: _Sample, new: NewToken) -> bool:
        """Add one token's text; True if a stop string ended the sample with it."""
        out, token = sample.output, new.token_id
        out.delta_token_ids.append(token)
        if sample.delta_logprobs is not None:
            sample.delta_logprobs.append(TokenLogprobs(token, new.logprob, new.top_logprobs))
        reason, stop = new.finish_reason, new.stop_reason
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
            out.finish_reason = reason.value
            out.stop_reason = stop
        return stopped

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forget a request; its last output, every unfinished sample marked aborted."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        for sample in request.samples:
            if not sample.output.finished:
                sample.output.finish_reason = FinishReason.ABORT.value
        return self._emit(request)

    def _emit(self, request: _Request) -> RequestOutput:
        """This step's deltas as an output; the deltas start over. A finished request is forgotten."""
        outputs = [self._snapshot(s) if self.snapshots else self._delta(s) for s in request.samples]
        for sample in request.samples:
            sample.output.delta_text = ""
            sample.output.delta_token_ids = []
            if sample.delta_logprobs is not None:
                sample.delta_logprobs = []
        if request.finished:
            del self.requests[request.request_id]
        prompt_logprobs = request.prompt_logprobs
        if not self.snapshots:
            request.prompt_logprobs = None
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs,
                             request.num_cached_tokens, prompt_logprobs)

    @staticmethod
    def _snapshot(sample: _Sample) -> CompletionOutput:
        """Everything so far. The token and logprob lists are the sample's own, not copies
        (copying them every step would cost time quadratic in the output's length): they grow
        while the request runs and are final once it has finished."""
        out = sample.output
        out.text += out.delta_text
        out.token_ids += out.delta_token_ids
        if out.logprobs is not None:
            out.logprobs += sample.delta_logprobs
        return CompletionOutput(
            out.index, out.text, out.token_ids, out.logprobs, out.finish_reason, out.stop_reason,
            out.delta_text, out.delta_token_ids,
        )

    @staticmethod
    def _delta(sample: _Sample) -> CompletionOutput:
        """The step's new text, tokens and their logprobs only."""
        out = sample.output
        return CompletionOutput(
            out.index, logprobs=sample.delta_logprobs, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
            delta_text=out.delta_text, delta_token_ids=out.delta_token_ids,
        )
