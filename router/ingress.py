"""The front door: OpenAI-compatible HTTP on FastAPI through `serve.ingress`.

It validates, applies the chat template, tokenizes once, hashes the prompt's blocks with the
engine's own function, and hands token ids to the LLMServer deployment through a handle whose
request router picks the replica. It never runs the model.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from kvserve.router import routing_metrics as metrics
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.openai_schema import ChatCompletionRequest, CompletionRequest
from kvserve.router.responses import (
    ChoiceState, TokenText, Usage, chat_logprobs, chunk_body, completion_body,
    completion_logprobs, openai_finish_reason,
)
from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.protocol import (
    GenerateRequest, OutputDelta, SampleDelta, SamplingParams, TokenLogprobs, prompt_length_problem,
)

REPLICA_HEADER = "x-kvserve-replica"
# `serve.ingress` pickles the class when it decorates it: everything its methods use must be
# defined above it.

app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, error: OpenAIError) -> JSONResponse:
    return error.response()


def invalid_value(error: RequestValidationError | ValidationError) -> OpenAIError:
    """A 400 naming the first field pydantic refused."""
    first = error.errors()[0]
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return bad_request(message, param)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    return invalid_value(error).response()


@app.exception_handler(ValidationError)
async def _sampling_error(_: Request, error: ValidationError) -> JSONResponse:
    return invalid_value(error).response()


def _engine_error(error: Exception) -> OpenAIError:
    """Map a failure from the LLMServer call to an HTTP error."""
    if isinstance(error, BackPressureError):
        return OpenAIError(503, "the server is overloaded, retry later", "server_overloaded", code="overloaded")
    cause = error.cause if isinstance(error, RayTaskError) else error
    if isinstance(cause, ValueError):
        return bad_request(str(cause))
    return OpenAIError(500, f"internal error: {cause!r}", "internal_error")


class _RequestTimer:
    """Per-request latency metrics, labelled with the replica that served it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last_token_at: float | None = None

    def tokens_arrived(self, replica: str) -> None:
        now = time.perf_counter()
        if self.last_token_at is None:
            metrics.TTFT.labels(replica).observe(now - self.start)
        else:
            metrics.ITL.labels(replica).observe(now - self.last_token_at)
        self.last_token_at = now

    def finished(self, replica: str, status: str) -> None:
        metrics.E2E.labels(replica).observe(time.perf_counter() - self.start)
        metrics.REQUESTS.labels(replica, status).inc()


class _Generation:
    """One HTTP request's generation: several prompts x n samples, merged into choices."""

    def __init__(self, ingress: "Ingress", request_id: str, body, chat: bool, num_prompts: int,
                 firsts: list[OutputDelta], streams: list, timers: list[_RequestTimer]):
        self.ingress, self.request_id, self.body, self.chat = ingress, request_id, body, chat
        self.n = body.n
        self.choices = [ChoiceState(i) for i in range(num_prompts * self.n)]
        self.firsts, self.streams, self.timers = firsts, streams, timers
        self.usage = Usage()
        for first in firsts:
            self.usage.prompt_tokens += first.num_prompt_tokens * self.n
            self.usage.cached_tokens += first.num_cached_tokens
            metrics.PROMPT_TOKENS.labels(first.replica).inc(first.num_prompt_tokens)
            metrics.PREFIX_QUERIED_TOKENS.labels(first.replica).inc(first.num_prompt_tokens)
            metrics.PREFIX_HIT_TOKENS.labels(first.replica).inc(first.num_cached_tokens)

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
        for sample in delta.samples:
            choice = self.choices[prompt_index * self.n + sample.index]
            choice.text += sample.text
            choice.token_ids += sample.token_ids
            choice.logprobs += sample.logprobs or []
            choice.finish_reason = openai_finish_reason(sample.finish_reason)
            new_tokens += len(sample.token_ids)
            touched.append((choice, sample))
        if new_tokens:
            self.usage.completion_tokens += new_tokens
            metrics.GENERATED_TOKENS.labels(replica).inc(new_tokens)
            self.timers[prompt_index].tokens_arrived(replica)
        if delta.finished:
            self.timers[prompt_index].finished(replica, "ok")
        return touched

    async def collect(self) -> dict:
        try:
            async for i, delta in self._deltas():
                self._fold(i, delta)
        except Exception as error:
            raise _engine_error(error) from error
        choices = [self._final_choice(c) for c in self.choices]
        return completion_body(self.request_id, self.ingress.model_name, choices, self.usage, self.chat)

    def _final_choice(self, choice: ChoiceState) -> dict:
        logprobs = self._logprobs(choice.logprobs, 0) if self._wants_logprobs() else None
        if self.chat:
            message = {"role": "assistant", "content": choice.text}
            return {"index": choice.index, "message": message, "logprobs": logprobs,
                    "finish_reason": choice.finish_reason}
        return {"index": choice.index, "text": choice.text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason}

    def _wants_logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    def _logprobs(self, entries: list[TokenLogprobs], text_start: int) -> dict:
        if self.chat:
            return chat_logprobs(entries, self.ingress.token_text)
        return completion_logprobs(entries, self.ingress.token_text, text_start)

    async def sse(self) -> AsyncIterator[bytes]:
        model = self.ingress.model_name
        usage_in_chunks = self.body.include_usage_in_stream
        if self.chat:
            first = [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for c in self.choices]
            yield _sse(chunk_body(self.request_id, model, first, None, True))
        try:
            async for i, delta in self._deltas():
                choices = [self._delta_choice(c, sample) for c, sample in self._fold(i, delta)]
                if choices:
                    yield _sse(chunk_body(self.request_id, model, choices, None, self.chat))
        except Exception as error:
            yield _sse(_engine_error(error).response().body, raw=True)
        if usage_in_chunks:
            yield _sse(chunk_body(self.request_id, model, [], self.usage, self.chat))
        yield b"data: [DONE]\n\n"

    def _delta_choice(self, choice: ChoiceState, sample: SampleDelta) -> dict:
        logprobs = None
        if self._wants_logprobs():
            logprobs = self._logprobs(sample.logprobs or [], len(choice.text) - len(sample.text))
        reason = openai_finish_reason(sample.finish_reason)
        if self.chat:
            return {"index": choice.index, "delta": {"content": sample.text},
                    "logprobs": logprobs, "finish_reason": reason}
        return {"index": choice.index, "text": sample.text, "logprobs": logprobs, "finish_reason": reason}


def _sse(body, raw: bool = False) -> bytes:
    payload = body if raw else json.dumps(body, ensure_ascii=False).encode()
    return b"data: " + payload + b"\n\n"


@dataclass(frozen=True)
class IngressSettings:
    served_model_name: str
    block_size: int
    max_model_len: int
    tokenizer: str  # folder
    api_key: str | None


@serve.ingress(app)
class Ingress:
    def __init__(self, llm: DeploymentHandle, settings: IngressSettings):
        self.llm = llm
        self.model_name = settings.served_model_name
        self.block_size = settings.block_size
        self.max_model_len = settings.max_model_len
        self.hash_check = hash_check_value(self.block_size)
        self.api_key = settings.api_key
        self.tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer, local_files_only=True)
        self.token_text = TokenText(self.tokenizer)
        self.app_name = serve.get_replica_context().app_name
        self.follower: KVIndexFollower | None = None

    def _ensure_follower(self) -> KVIndexFollower:
        if self.follower is None:
            self.follower = KVIndexFollower.for_app(self.app_name, self.block_size)
        self.follower.ensure_running()
        return self.follower

    # -- checks ------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise OpenAIError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                              f"{self.model_name!r}", "invalid_request_error", "model", "model_not_found")

    def _tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            text = prompt
        else:
            ids, text = list(prompt), self.tokenizer.decode(prompt)
        problem = prompt_length_problem(len(ids), self.max_model_len)
        if problem is not None:
            raise bad_request(problem, "prompt")
        return text, ids

    def _max_tokens(self, ids: list[int], asked: int | None) -> int:
        room = self.max_model_len - len(ids)
        if asked is not None and asked > room:
            raise bad_request(f"max_tokens {asked} plus the prompt's {len(ids)} tokens exceed "
                              f"max_model_len {self.max_model_len}", "max_tokens")
        return asked or room

    # -- endpoints ---------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> Response:
        replicas = sorted(self._ensure_follower().stats)
        status = 200 if replicas else 503
        return JSONResponse({"ready": bool(replicas), "replicas": replicas}, status_code=status)

    @app.get("/metrics")
    async def metrics_text(self) -> Response:
        follower = self._ensure_follower()
        index_blocks = {r: len(state.blocks) for r, state in list(follower.index.replicas.items())}
        metrics.export_replica_stats(dict(follower.stats), index_blocks, len(follower.rejected))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "kvserve",
                "max_model_len": self.max_model_len, "vocab_size": len(self.tokenizer)}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._authorize(request)
        self._check_model(body.model)
        prompts = [self._tokenize(p) for p in body.prompts()]
        max_tokens = min(self._max_tokens(ids, body.max_tokens) for _, ids in prompts)
        sampling = body.sampling(max_tokens, body.logprobs)
        return await self._serve(prompts, sampling, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._authorize(request)
        self._check_model(body.model)
        if not self.tokenizer.chat_template:
            raise bad_request("this model's tokenizer has no chat template", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, tokenize=False
        )
        prompt = self._tokenize(text, add_special_tokens=False)
        sampling = body.sampling(self._max_tokens(prompt[1], body.requested_max_tokens()), body.logprobs_count())
        return await self._serve([prompt], sampling, body, chat=True)

    # -- generation --------------------------------------------------------------------

    async def _serve(self, prompts, sampling: SamplingParams, body, chat: bool) -> Response:
        self._ensure_follower()
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        streams = [self._start(f"{request_id}-{i}", text, ids, sampling, body) for i, (text, ids) in enumerate(prompts)]
        timers = [_RequestTimer() for _ in streams]
        try:
            firsts = await asyncio.gather(*(anext(s) for s in streams))
        except Exception as error:
            for s in streams:
                s.cancel()
            raise _engine_error(error) from error
        replicas = [f.replica for f in firsts]
        headers = {REPLICA_HEADER: ",".join(dict.fromkeys(replicas))}
        run = _Generation(self, request_id, body, chat, len(prompts), firsts, streams, timers)
        if body.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
        return JSONResponse(await run.collect(), headers=headers)

    def _start(self, request_id: str, text: str, ids: list[int], sampling: SamplingParams, body):
        request = GenerateRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling=sampling,
            prompt=text,
            block_hashes=hash_block_chain(ids, self.block_size, body.cache_salt),
            hash_check=self.hash_check,
            cache_salt=body.cache_salt,
            priority=body.priority,
        )
        return self.llm.options(stream=True).generate.remote(request)
