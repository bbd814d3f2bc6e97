"""The front door: OpenAI-compatible HTTP on FastAPI through `serve.ingress`.

It validates, applies the chat template, tokenizes once, hashes the prompt's blocks with the
engine's own function, and hands token ids to the LLMServer deployment through a handle whose
request router picks the replica. It never runs the model.
"""

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve._private.common import ReplicaState
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from kvserve.router import routing_metrics as metrics
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.openai_schema import ChatCompletionRequest, CompletionRequest, validation_problem
from kvserve.router.responses import (
    ChoiceState, TokenText, Usage, chat_logprobs, chunk_body, completion_body,
    completion_logprobs, openai_finish_reason,
)
from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.protocol import (
    GenerateRequest, OutputDelta, RequestRefused, SampleDelta, SamplingParams, TokenLogprobs,
    prompt_length_problem,
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
    return bad_request(*validation_problem(error.errors()[0]))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    return invalid_value(error).response()


@app.exception_handler(ValidationError)
async def _sampling_error(_: Request, error: ValidationError) -> JSONResponse:
    return invalid_value(error).response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method, body too large) in OpenAI's shape."""
    messages = {404: f"there is no route {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}
    message = messages.get(error.status_code, str(error.detail))
    return OpenAIError(error.status_code, message, "invalid_request_error").response()


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, error: Exception) -> JSONResponse:
    return OpenAIError(500, f"internal error: {type(error).__name__}", "internal_error").response()


class _BodySizeLimit:
    """413 for a body over `app.state.max_request_bytes`: at once when Content-Length says so,
    otherwise as soon as the streamed body passes the limit."""

    def __init__(self, asgi_app):
        self.asgi_app = asgi_app

    async def __call__(self, scope, receive, send):
        # The app Serve runs is a copy unpickled in the replica, not this module's `app`.
        limit = getattr(scope["app"].state, "max_request_bytes", None) if "app" in scope else None
        if scope["type"] != "http" or limit is None:
            return await self.asgi_app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _too_large(limit).response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, _too_large(limit).message)
            return message

        await self.asgi_app(scope, limited_receive, send)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"the request body is larger than {limit} bytes", "invalid_request_error")


app.add_middleware(_BodySizeLimit)


@dataclass(frozen=True)
class ApiKeyGate:
    """Which paths need the API key, and whether a request's `authorization` header holds it:
    compared in constant time on the raw header bytes."""

    authorization: bytes  # b"Bearer <key>"
    metrics_too: bool

    def protects(self, path: str) -> bool:
        return path.startswith("/v1/") or (self.metrics_too and path == "/metrics")

    def admits(self, header: bytes) -> bool:
        return hmac.compare_digest(header, self.authorization)


class _ApiKeyCheck:
    """401 for a protected path without the key, before the body is even read."""

    def __init__(self, asgi_app):
        self.asgi_app = asgi_app

    async def __call__(self, scope, receive, send):
        gate = getattr(scope["app"].state, "api_key_gate", None) if "app" in scope else None
        if scope["type"] == "http" and gate is not None and gate.protects(scope["path"]):
            if not gate.admits(dict(scope["headers"]).get(b"authorization", b"")):
                error = OpenAIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                                    "authentication_error", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.asgi_app(scope, receive, send)


app.add_middleware(_ApiKeyCheck)


RETRY_AFTER_S = 1
REPLICA_RETRIES = 2  # sends of a request whose replica died before its first output


class RetryLater(OpenAIError):
    """An error that says when to come back (`Retry-After`)."""

    def response(self) -> JSONResponse:
        reply = super().response()
        reply.headers["retry-after"] = str(RETRY_AFTER_S)
        return reply


def _replica_died(error: BaseException) -> bool:
    """Whether the replica serving a call died (the error may come wrapped in a task error)."""
    return isinstance(error, RayActorError) or isinstance(getattr(error, "cause", None), RayActorError)


def _engine_error(error: Exception) -> OpenAIError:
    """Map a failure from the LLMServer call to an HTTP error."""
    if isinstance(error, BackPressureError):
        return RetryLater(429, "too many requests are waiting for the model: retry after a moment",
                          "requests", code="rate_limit_exceeded")
    if _replica_died(error):
        return RetryLater(503, "the replica serving this request stopped before it finished: retry the request",
                          "server_error", code="replica_stopped")
    if isinstance(error, OpenAIError):
        return error
    cause = error.cause if isinstance(error, RayTaskError) else error
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
    vocab_size: int  # the model's: token ids from clients must be below it
    max_n: int
    max_stop_strings: int
    max_request_bytes: int
    metrics_need_api_key: bool = False


@serve.ingress(app)
class Ingress:
    def __init__(self, llm: DeploymentHandle, settings: IngressSettings):
        self.llm = llm
        self.model_name = settings.served_model_name
        self.block_size = settings.block_size
        self.max_model_len = settings.max_model_len
        self.settings = settings
        app.state.max_request_bytes = settings.max_request_bytes
        self.hash_check = hash_check_value(self.block_size)
        if settings.api_key is not None:
            app.state.api_key_gate = ApiKeyGate(f"Bearer {settings.api_key}".encode(), settings.metrics_need_api_key)
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

    def _running_llm_replicas(self) -> int:
        """LLMServer replicas the Serve controller reports RUNNING: the set the handle's router
        sends requests to, so one request can be served as soon as this is above zero."""
        app_status = serve.status().applications.get(self.app_name)
        deployment = app_status.deployments.get(self.llm.deployment_name) if app_status else None
        return deployment.replica_states.get(ReplicaState.RUNNING, 0) if deployment else 0

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                              f"{self.model_name!r}", "invalid_request_error", "model", "model_not_found")

    def _tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            text = prompt
        else:
            self._check_token_ids(prompt, "prompt")
            ids, text = list(prompt), self.tokenizer.decode(prompt)
        problem = prompt_length_problem(len(ids), self.max_model_len)
        if problem is not None:
            raise bad_request(problem, "prompt")
        return text, ids

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        """Before anything decodes them: an id a tokenizer cannot hold raises OverflowError."""
        bad = next((t for t in ids if not 0 <= t < self.settings.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} in {param} is outside the vocabulary "
                              f"[0, {self.settings.vocab_size})", param)

    def _check_sampling_limits(self, body) -> None:
        """The server's limits, which the schema cannot know."""
        if body.n > self.settings.max_n:
            raise bad_request(f"n must be <= {self.settings.max_n}", "n")
        if body.stop and len(body.stop) > self.settings.max_stop_strings:
            raise bad_request(f"stop may hold at most {self.settings.max_stop_strings} strings", "stop")
        if body.top_k is not None and body.top_k > self.settings.vocab_size:
            raise bad_request(f"top_k must be <= the vocabulary size {self.settings.vocab_size}", "top_k")
        self._check_token_ids(body.stop_token_ids or [], "stop_token_ids")

    def _chat_prompt(self, body: ChatCompletionRequest) -> str:
        if not self.tokenizer.chat_template:
            raise bad_request("this model's tokenizer has no chat template", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt, tokenize=False
            )
        except (TemplateError, TypeError, ValueError) as error:
            raise bad_request(f"the model's chat template cannot take these messages: {error}", "messages") from None

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
        """Ready once Serve runs an LLMServer replica; `replicas` lists those whose KV events the
        router follows (the KV-aware policy routes on them)."""
        running = await asyncio.to_thread(self._running_llm_replicas)
        body = {"ready": running > 0, "running_replicas": running, "replicas": sorted(self._ensure_follower().stats)}
        return JSONResponse(body, status_code=200 if running else 503)

    @app.get("/metrics")
    async def metrics_text(self) -> Response:
        follower = self._ensure_follower()
        index_blocks = {r: len(state.blocks) for r, state in list(follower.index.replicas.items())}
        metrics.export_replica_stats(dict(follower.stats), index_blocks, len(follower.rejected))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "kvserve",
                "max_model_len": self.max_model_len, "vocab_size": len(self.tokenizer)}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        self._check_sampling_limits(body)
        prompts = [self._tokenize(p) for p in body.prompts()]
        max_tokens = min(self._max_tokens(ids, body.max_tokens) for _, ids in prompts)
        sampling = body.sampling(max_tokens, body.logprobs)
        return await self._serve(prompts, sampling, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        self._check_sampling_limits(body)
        prompt = self._tokenize(self._chat_prompt(body), add_special_tokens=False)
        sampling = body.sampling(self._max_tokens(prompt[1], body.requested_max_tokens()), body.logprobs_count())
        return await self._serve([prompt], sampling, body, chat=True)

    # -- generation --------------------------------------------------------------------

    async def _serve(self, prompts, sampling: SamplingParams, body, chat: bool) -> Response:
        self._ensure_follower()
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        starts = [self._start(f"{request_id}-{i}", text, ids, sampling, body) for i, (text, ids) in enumerate(prompts)]
        timers = [_RequestTimer() for _ in starts]
        started = await asyncio.gather(*starts, return_exceptions=True)
        failures = [s for s in started if isinstance(s, BaseException)]
        if failures:
            for s in started:
                if not isinstance(s, BaseException):
                    s[0].cancel()
            raise _engine_error(failures[0]) from failures[0]
        streams, firsts = [s for s, _ in started], [f for _, f in started]
        replicas = [f.replica for f in firsts]
        headers = {REPLICA_HEADER: ",".join(dict.fromkeys(replicas))}
        run = _Generation(self, request_id, body, chat, len(prompts), firsts, streams, timers)
        if body.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
        return JSONResponse(await run.collect(), headers=headers)

    async def _start(self, request_id: str, text: str, ids: list[int], sampling: SamplingParams, body):
        """The stream of one prompt and its first delta. A replica that dies before the first
        delta has given the client nothing: the request goes again, to a live replica."""
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
        for attempt in range(REPLICA_RETRIES + 1):
            stream = self.llm.options(stream=True).generate.remote(request)
            try:
                first = await anext(stream)
            except BaseException as error:
                stream.cancel()
                if not _replica_died(error) or attempt == REPLICA_RETRIES:
                    raise
                continue
            if isinstance(first, RequestRefused):
                stream.cancel()
                raise bad_request(first.reason)
            return stream, first
