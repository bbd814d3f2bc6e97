"""One HTTP request's generation: the streams of its prompts from the LLMServer replicas,
merged into OpenAI choices, as one body or as server-sent events."""

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable

from kvserve.router import routing_metrics as metrics
from kvserve.router.errors import OpenAIError, engine_error
from kvserve.router.reasoning import ReasoningSplitter, ThinkingTokens
from kvserve.router.responses import (
    ChoiceState, TokenText, Usage, chat_logprobs, chunk_body, completion_body, completion_logprobs,
    echoed_prompt_logprobs, openai_finish_reason, token_id_text, vllm_prompt_logprobs,
)
from kvserve.router.served_model import Prompt
from kvserve.router.tool_parsers import NamedCallReader, Parsed, ToolCallReader
from kvserve.workers.protocol import OutputDelta, PromptLogprobs, SampleDelta, TokenLogprobs

class RequestTimer:
    """Per-request latency metrics, labelled with the model and the replica that served it."""

    def __init__(self, model: str):
        self.model = model
        self.start = time.perf_counter()
        self.last_token_at: float | None = None
        self.done = False

    def tokens_arrived(self, replica: str) -> None:
        now = time.perf_counter()
        if self.last_token_at is None:
            metrics.TTFT.labels(self.model, replica).observe(now - self.start)
        else:
            metrics.ITL.labels(self.model, replica).observe(now - self.last_token_at)
        self.last_token_at = now

    def finished(self, replica: str, status: str) -> None:
        self.done = True
        metrics.E2E.labels(self.model, replica).observe(time.perf_counter() - self.start)
        metrics.REQUESTS.labels(self.model, replica, status).inc()


class Generation:
    """One HTTP request's generation: several prompts x n samples, merged into choices. A
    completion with `echo` starts each choice with its prompt (and its logprobs with the
    prompt's); one with `max_tokens` 0 keeps none of the generated token."""

    def __init__(self, model_name: str, token_text: TokenText, request_id: str, body, chat: bool,
                 prompts: list[Prompt], firsts: list[OutputDelta], streams: list, timers: list[RequestTimer],
                 tool_call_reader: Callable[[], ToolCallReader | NamedCallReader] | None = None,
                 reasoning_parser: str | None = None, thinking_tags: tuple[int, int] | None = None):
        self.model_name = model_name
        self.token_text = token_id_text if body.return_tokens_as_token_ids else token_text
        self.request_id, self.body, self.chat = request_id, body, chat
        self.n = body.n
        self.prompts = prompts
        self.echo = not chat and body.echo
        self.generates = chat or body.generates
        self.scored: list[PromptLogprobs | None] = [None] * len(prompts)  # each prompt's, once they came
        self.choices = [ChoiceState(i) for i in range(len(prompts) * self.n)]
        counts_thinking = reasoning_parser is not None and thinking_tags is not None
        for choice in self.choices:
            if tool_call_reader is not None:
                choice.tool_calls = tool_call_reader()
            if reasoning_parser is not None:
                prompt = prompts[choice.index // self.n].text
                choice.reasoning = ReasoningSplitter(reasoning_parser, prompt)
                if counts_thinking:
                    choice.thinking_tokens = ThinkingTokens(reasoning_parser, prompt, *thinking_tags, token_text)
        self.firsts, self.streams, self.timers = firsts, streams, timers
        self.usage = Usage(reasoning_tokens=0 if counts_thinking else None)
        for first in firsts:
            self.usage.prompt_tokens += first.num_prompt_tokens * self.n
            self.usage.cached_tokens += first.num_cached_tokens
            metrics.PROMPT_TOKENS.labels(model_name, first.replica).inc(first.num_prompt_tokens)
            metrics.PREFIX_QUERIED_TOKENS.labels(model_name, first.replica).inc(first.num_prompt_tokens)
            metrics.PREFIX_HIT_TOKENS.labels(model_name, first.replica).inc(first.num_cached_tokens)

    async def _deltas(self) -> AsyncIterator[tuple[int, OutputDelta]]:
        """(prompt index, delta) in arrival order across the prompts' streams."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                await queue.put((i, self.firsts[i]))
                if not self.firsts[i].finished:
                    async for delta in self.streams[i]:
                        await queue.put((i, delta))
            except Exception as error:  # surfaced to the consumer below
                await queue.put((i, error))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.streams))]
        open_streams = len(tasks)
        try:
            while open_streams:
                i, item = await queue.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for stream in self.streams:
                stream.cancel()

    def _fold(self, prompt_index: int, delta: OutputDelta) -> list[tuple[ChoiceState, SampleDelta]]:
        """Apply a delta; returns each touched choice with its sample's delta."""
        replica = delta.replica
        touched = []
        new_tokens = 0
        if delta.prompt_logprobs is not None:
            self.scored[prompt_index] = delta.prompt_logprobs
        for sample in delta.samples:
            if not self.generates:
                sample = dataclasses.replace(sample, text="", token_ids=[], logprobs=None)
            choice = self.choices[prompt_index * self.n + sample.index]
            choice.text += sample.text
            choice.token_ids += sample.token_ids
            choice.logprobs += sample.logprobs or []
            choice.finish_reason = openai_finish_reason(sample.finish_reason)
            choice.stop_reason = sample.stop_reason
            new_tokens += len(sample.token_ids)
            if choice.thinking_tokens is not None:
                self.usage.reasoning_tokens += choice.thinking_tokens.feed(sample.token_ids,
                                                                           last=sample.finish_reason is not None)
            touched.append((choice, sample))
        if new_tokens:
            self.usage.completion_tokens += new_tokens
            metrics.GENERATED_TOKENS.labels(self.model_name, replica).inc(new_tokens)
            self.timers[prompt_index].tokens_arrived(replica)
        if delta.finished:
            self.timers[prompt_index].finished(replica, "ok")
        return touched

    def _failed(self, error: OpenAIError) -> OpenAIError:
        """`error`, once each prompt that had not finished is counted as ended by it."""
        for timer, first in zip(self.timers, self.firsts):
            if not timer.done:
                timer.finished(first.replica, error.code or error.type)
        return error

    async def collect(self) -> dict:
        try:
            async for i, delta in self._deltas():
                self._fold(i, delta)
        except Exception as error:
            raise self._failed(engine_error(error)) from error
        choices = [self._final_choice(c) for c in self.choices]
        body = completion_body(self.request_id, self.model_name, choices, self.usage, self.chat)
        if self.chat and self.body.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(0)
        return body

    def _final_choice(self, choice: ChoiceState) -> dict:
        if self.chat:
            logprobs = chat_logprobs(choice.logprobs, self.token_text) if self.body.logprobs else None
            message, reason = _chat_message(choice)
            return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                    "stop_reason": choice.stop_reason}
        final = {"index": choice.index, "text": self._echoed(choice, choice.text),
                 "logprobs": self._completion_logprobs(choice, choice.logprobs, 0, with_prompt=True),
                 "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
        return self._with_prompt_logprobs(choice, final)

    def _prompt_of(self, choice: ChoiceState) -> int:
        return choice.index // self.n

    def _echoed(self, choice: ChoiceState, text: str) -> str:
        """The choice's `text` (all of it, or a stream's first piece), after its prompt when the
        request echoes."""
        return self.prompts[self._prompt_of(choice)].text + text if self.echo else text

    def _completion_logprobs(self, choice: ChoiceState, entries: list[TokenLogprobs], text_start: int,
                             with_prompt: bool) -> dict | None:
        """The completion logprobs of `entries`, tokens of the choice's output whose text starts
        at `text_start` of it; echoed, after the prompt's text, and `with_prompt` after the
        prompt's own entries."""
        if self.body.logprobs is None:
            return None
        prompt_index = self._prompt_of(choice)
        prompt = self.prompts[prompt_index]
        shift = len(prompt.text) if self.echo else 0
        generated = completion_logprobs(entries, self.token_text, shift + text_start)
        if not (self.echo and with_prompt):
            return generated
        echoed = echoed_prompt_logprobs(prompt.ids, self.scored[prompt_index], self.body.logprobs)
        before = completion_logprobs(echoed, self.token_text, 0)
        return {key: before[key] + generated[key] for key in before}

    def _with_prompt_logprobs(self, choice: ChoiceState, body: dict) -> dict:
        if self.body.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(self._prompt_of(choice))
        return body

    def _vllm_prompt_logprobs(self, prompt_index: int) -> list[dict | None]:
        return vllm_prompt_logprobs(self.scored[prompt_index], self.token_text, self.body.prompt_logprobs)

    async def sse(self) -> AsyncIterator[bytes]:
        """The stream as server-sent events; a failure midway is its last event before [DONE]."""
        try:
            async for chunk in self.chunks():
                yield _sse(chunk)
        except OpenAIError as error:
            yield _sse(error.response().body, raw=True)
        yield b"data: [DONE]\n\n"

    async def chunks(self) -> AsyncIterator[dict]:
        """The stream's chunks, as OpenAI's chunk objects; an engine failure midway raises its
        OpenAIError."""
        model = self.model_name
        running_usage = self.usage if self.body.usage_in_every_chunk else None
        if self.chat:
            first = [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for c in self.choices]
            yield chunk_body(self.request_id, model, first, running_usage, True)
        try:
            async for i, delta in self._deltas():
                choices = [self._delta_choice(c, sample) for c, sample in self._fold(i, delta)]
                if choices:
                    chunk = chunk_body(self.request_id, model, choices, running_usage, self.chat)
                    if self.chat and delta.prompt_logprobs is not None and self.body.prompt_logprobs is not None:
                        chunk["prompt_logprobs"] = self._vllm_prompt_logprobs(i)
                    yield chunk
        except Exception as error:
            raise self._failed(engine_error(error)) from error
        if self.body.include_usage_in_stream:
            yield chunk_body(self.request_id, model, [], self.usage, self.chat)

    def _delta_choice(self, choice: ChoiceState, sample: SampleDelta) -> dict:
        """A choice's part of a chunk; a completion's first one carries its echoed prompt."""
        if self.chat:
            logprobs = chat_logprobs(sample.logprobs or [], self.token_text) if self.body.logprobs else None
            delta, reason = _chat_delta(choice, sample)
            return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                    "stop_reason": sample.stop_reason}
        first, choice.streamed = not choice.streamed, True
        logprobs = self._completion_logprobs(choice, sample.logprobs or [], len(choice.text) - len(sample.text),
                                             with_prompt=first)
        part = {"index": choice.index, "text": self._echoed(choice, sample.text) if first else sample.text,
                "logprobs": logprobs, "finish_reason": openai_finish_reason(sample.finish_reason),
                "stop_reason": sample.stop_reason}
        return self._with_prompt_logprobs(choice, part) if first else part


def _chat_message(choice: ChoiceState) -> tuple[dict, str | None]:
    """A whole choice's message (its thinking apart, its answer's tool calls read) and finish reason."""
    answer = choice.text
    reasoning = None
    if choice.reasoning is not None:
        split = choice.reasoning.feed(answer, last=True)
        answer, reasoning = split.content, split.reasoning
    message, reason = {"role": "assistant", "content": answer}, choice.finish_reason
    if choice.tool_calls is not None:
        message, reason = _with_tool_calls(choice, answer)
    if reasoning is not None:
        message["reasoning_content"] = reasoning or None
        message["content"] = message["content"] or None
    return message, reason


def _chat_delta(choice: ChoiceState, sample: SampleDelta) -> tuple[dict, str | None]:
    """A streamed choice's delta (its thinking apart, its answer's tool calls read) and finish reason."""
    answer, reasoning = sample.text, ""
    if choice.reasoning is not None:
        split = choice.reasoning.feed(answer, last=sample.finish_reason is not None)
        answer, reasoning = split.content, split.reasoning
    delta, reason = {"content": answer}, openai_finish_reason(sample.finish_reason)
    if choice.tool_calls is not None:
        delta, reason = _tool_call_delta(choice, answer, sample.finish_reason)
    if reasoning:
        if not delta.get("content"):
            delta.pop("content", None)
        delta["reasoning_content"] = reasoning
    return delta, reason


def _with_tool_calls(choice: ChoiceState, answer: str) -> tuple[dict, str | None]:
    """The final message of a choice whose `answer` may hold tool calls, and its finish reason."""
    reader = choice.tool_calls
    content = reader.feed(answer).content + reader.finish().content
    message = {"role": "assistant", "content": (content or None) if reader.calls else content}
    if reader.calls:
        message["tool_calls"] = [call.to_openai() for call in reader.calls]
    return message, openai_finish_reason(choice.finish_reason, bool(reader.calls))


def _tool_call_delta(choice: ChoiceState, answer: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The streamed delta of a choice whose answer may hold tool calls, `answer` its latest
    piece: the content that is certain by now, and each call's name, then its arguments, as
    they come."""
    reader = choice.tool_calls
    parsed = reader.feed(answer)
    if finish_reason is not None:
        last = reader.finish()
        parsed = Parsed(parsed.content + last.content, parsed.calls + last.calls)
    delta: dict = {"content": parsed.content} if parsed.content or not parsed.calls else {}
    if parsed.calls:
        delta["tool_calls"] = [call.to_openai() for call in parsed.calls]
    return delta, openai_finish_reason(finish_reason, bool(reader.calls))


def _sse(body, raw: bool = False) -> bytes:
    payload = body if raw else json.dumps(body, ensure_ascii=False).encode()
    return b"data: " + payload + b"\n\n"
