"""The front door: OpenAI-compatible HTTP on FastAPI through `serve.ingress`.

It validates, applies the chat template, tokenizes once, hashes the prompt's blocks with the
engine's own function, and hands token ids to the LLMServer deployment through a handle whose
request router picks the replica. It never runs the model.
"""

import asyncio
import uuid
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve import context as serve_context
from ray.serve._private.common import ReplicaState
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from kvserve.router import routing_metrics as metrics
from kvserve.router.errors import OpenAIError, bad_request, engine_error, replica_died
from kvserve.router.generation import Generation, RequestTimer
from kvserve.router.http_app import ApiKeyGate, app
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.openai_schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from kvserve.router.responses import TokenText, embeddings_body
from kvserve.router.tool_parsers import FORMATS, format_for_model
from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.protocol import (
    EmbeddingOutput, EmbedRequest, GenerateRequest, RequestRefused, SamplingParams, prompt_length_problem,
)

REPLICA_HEADER = "x-kvserve-replica"
REPLICA_RETRIES = 2  # sends of a request whose replica died before its first output


@dataclass(frozen=True)
class IngressSettings:
    served_model_name: str
    block_size: int
    max_model_len: int
    tokenizer: str  # folder
    tokenizer_gguf_file: str | None  # the GGUF file in that folder whose metadata holds the tokenizer
    api_key: str | None
    vocab_size: int  # the model's: token ids from clients must be below it
    hidden_size: int  # the model's: the length of an embedding
    normalize_embeddings: bool
    max_n: int
    max_stop_strings: int
    max_request_bytes: int
    metrics_need_api_key: bool
    tool_parser: str | None = None  # a name in tool_parsers.FORMATS; None: the model's own


def _route_on_its_own(request_id: str) -> None:
    """Give the calls this task makes a Serve request id of their own. Serve's request router
    hands the replica it chose for a request to the pending request of the same id, and the
    calls of one HTTP request (several prompts or inputs) share that request's id: all but
    one of them would never be routed. Each prompt runs in a task of its own (asyncio.gather),
    so the id set here stays with that task's calls."""
    serve_context._set_request_context(_internal_request_id=request_id)


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
        self.tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer, local_files_only=True,
                                                       gguf_file=settings.tokenizer_gguf_file)
        self.token_text = TokenText(self.tokenizer)
        self.tool_format = (FORMATS[settings.tool_parser] if settings.tool_parser
                            else format_for_model(settings.tokenizer, self.tokenizer.chat_template))
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
        messages = [m.for_template() for m in body.messages]
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=body.template_tools(), add_generation_prompt=body.add_generation_prompt, tokenize=False
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

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        self._check_model(body.model)
        if body.dimensions is not None and body.dimensions > self.settings.hidden_size:
            raise bad_request(f"dimensions must be <= the model's embedding size {self.settings.hidden_size}",
                              "dimensions")
        prompts = [self._tokenize(p) for p in body.inputs()]
        self._ensure_follower()
        request_id = f"embd-{uuid.uuid4().hex}"
        embeds = [self._embed(f"{request_id}-{i}", text, ids, body) for i, (text, ids) in enumerate(prompts)]
        results = await asyncio.gather(*embeds, return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure if isinstance(failure, OpenAIError) else engine_error(failure) from failure
        return JSONResponse(embeddings_body(self.model_name, results, body.encoding_format, body.dimensions,
                                            self.settings.normalize_embeddings))

    async def _embed(self, request_id: str, text: str, ids: list[int], body: EmbeddingRequest) -> EmbeddingOutput:
        """One prompt's embedding; sent again, to a live replica, if its replica died first."""
        _route_on_its_own(request_id)
        request = EmbedRequest(request_id, ids, text, hash_block_chain(ids, self.block_size, body.cache_salt),
                               self.hash_check, body.cache_salt, body.priority)
        for attempt in range(REPLICA_RETRIES + 1):
            stream = self.llm.options(stream=True).embed.remote(request)
            try:
                answer = await anext(stream)
            except BaseException as error:
                stream.cancel()
                if not replica_died(error) or attempt == REPLICA_RETRIES:
                    raise
                continue
            if isinstance(answer, RequestRefused):
                raise bad_request(answer.reason)
            return answer

    # -- generation --------------------------------------------------------------------

    async def _serve(self, prompts, sampling: SamplingParams, body, chat: bool) -> Response:
        self._ensure_follower()
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        starts = [self._start(f"{request_id}-{i}", text, ids, sampling, body) for i, (text, ids) in enumerate(prompts)]
        timers = [RequestTimer() for _ in starts]
        started = await asyncio.gather(*starts, return_exceptions=True)
        failures = [s for s in started if isinstance(s, BaseException)]
        if failures:
            for s in started:
                if not isinstance(s, BaseException):
                    s[0].cancel()
            raise engine_error(failures[0]) from failures[0]
        streams, firsts = [s for s, _ in started], [f for _, f in started]
        replicas = [f.replica for f in firsts]
        headers = {REPLICA_HEADER: ",".join(dict.fromkeys(replicas))}
        reader = body.tool_call_reader(self.tool_format) if chat else None
        run = Generation(self.model_name, self.token_text, request_id, body, chat, len(prompts), firsts, streams,
                         timers, reader)
        if body.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
        return JSONResponse(await run.collect(), headers=headers)

    async def _start(self, request_id: str, text: str, ids: list[int], sampling: SamplingParams, body):
        """The stream of one prompt and its first delta. A replica that dies before the first
        delta has given the client nothing: the request goes again, to a live replica."""
        _route_on_its_own(request_id)
        request = GenerateRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling=sampling,
            prompt=text,
            block_hashes=hash_block_chain(ids, self.block_size, body.cache_salt),
            hash_check=self.hash_check,
            cache_salt=body.cache_salt,
            priority=body.priority,
            kv_retention=body.retention(),
        )
        for attempt in range(REPLICA_RETRIES + 1):
            stream = self.llm.options(stream=True).generate.remote(request)
            try:
                first = await anext(stream)
            except BaseException as error:
                stream.cancel()
                if not replica_died(error) or attempt == REPLICA_RETRIES:
                    raise
                continue
            if isinstance(first, RequestRefused):
                stream.cancel()
                raise bad_request(first.reason)
            return stream, first
