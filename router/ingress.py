"""The front door: OpenAI-compatible HTTP on FastAPI through `serve.ingress`.

A request's `model` picks one of the served models (`served_model.py`), which validates,
applies the chat template, tokenizes once, hashes the prompt's blocks with the engine's own
function, and hands token ids to its LLMServer deployment. The ingress never runs a model.
"""

import asyncio
import uuid
from importlib.metadata import version as package_version

from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from kvserve.router import routing_metrics as metrics
from kvserve.router.errors import OpenAIError, bad_request, engine_error, unknown_lora, unknown_model
from kvserve.router.generation import Generation, RequestTimer
from kvserve.router.http_app import ApiKeyGate, app
from kvserve.router.openai_schema import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, LoadLoRAAdapterRequest,
    RerankRequest, ScoreRequest, TokenizeRequest, UnloadLoRAAdapterRequest,
)
from kvserve.router.anthropic_messages import MessageBuilder, MessagesRequest, TokenCountRequest
from kvserve.router.openai_responses import ResponseBuilder, ResponsesRequest
from kvserve.router.response_store import get_or_create_store
from kvserve.router.responses import cosine, embeddings_body, rerank_body, score_body
from kvserve.router.served_model import IngressSettings, LoRAChoice, ServedModel
from kvserve.workers.protocol import EmbeddingOutput, SamplingParams

REPLICA_HEADER = "x-kvserve-replica"


def _not_stored(response_id: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(404, f"no response {response_id!r} is stored: it was made with store false, deleted, or "
                            "is older than the store keeps", "invalid_request_error", param, "not_found")


@serve.ingress(app)
class Ingress:
    def __init__(self, models: list[IngressSettings], llm: DeploymentHandle | None = None):
        """`llm`: the deployment of the one model, in this application. Without it, each model
        runs in an application of its own (`served_model.model_app_name`)."""
        front_door = models[0]  # its settings come from the cluster's serving, the same for every model
        app.state.max_request_bytes = front_door.max_request_bytes
        if front_door.api_key is not None:
            app.state.api_key_gate = ApiKeyGate(front_door.api_key.encode(),
                                                front_door.metrics_need_api_key)
        self.app_name = serve.get_replica_context().app_name
        if llm is not None:
            served = [ServedModel(models[0], llm, self.app_name)]
        else:
            served = [ServedModel.in_own_app(settings, self.app_name) for settings in models]
        self.models = {model.name: model for model in served}
        self.response_store = None  # the Responses API's, once a request needs it

    async def _model(self, name: str | None) -> tuple[ServedModel, LoRAChoice | None]:
        """The model a request names, and the LoRA adapter when the name is one of its adapters;
        with a single model, also a request that names none."""
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values())), None
        if name in self.models:
            return self.models[name], None
        for model in self.models.values():
            folder = await model.lora_folder(name)
            if folder is not None:
                return model, LoRAChoice(name, folder)
        raise unknown_model(name, await self._served_names())

    async def _served_names(self) -> list[str]:
        """Every name a request may use as `model`: the base models, then their adapters."""
        adapters = [name for model in self.models.values() for name in await model.lora_folders()]
        return [*self.models, *adapters]

    def _lora_base(self, name: str | None) -> ServedModel:
        """The base model an adapter is loaded onto: the one named, or the only one serving adapters."""
        if name is not None:
            if name not in self.models:
                raise unknown_model(name, list(self.models))
            model = self.models[name]
            if model.lora_registry is None:
                raise bad_request(f"the model {name!r} serves no LoRA adapters (enable_lora)", "model")
            return model
        bases = [model for model in self.models.values() if model.lora_registry is not None]
        if len(bases) != 1:
            raise bad_request("no model serves LoRA adapters (enable_lora)" if not bases else
                              "several models serve LoRA adapters: name the base in `model`", "model")
        return bases[0]

    # -- endpoints ---------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> Response:
        """Ready once Serve runs an LLMServer replica of every model; `replicas` lists those whose
        KV events the routers follow (the KV-aware policy routes on them)."""
        running = {name: await asyncio.to_thread(model.running_replicas) for name, model in self.models.items()}
        followed = {name: sorted(model.ensure_follower().stats) for name, model in self.models.items()}
        ready = all(running.values())
        body = {"ready": ready, "running_replicas": sum(running.values()),
                "replicas": sorted(r for replicas in followed.values() for r in replicas),
                "models": {name: {"running_replicas": running[name], "replicas": followed[name]} for name in running}}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_text(self) -> Response:
        followers = {name: model.ensure_follower() for name, model in self.models.items()}
        stats = {r: s for follower in followers.values() for r, s in list(follower.stats.items())}
        index_blocks = {r: len(state.blocks) for follower in followers.values()
                        for r, state in list(follower.index.replicas.items())}
        untrusted = sum(len(follower.rejected) for follower in followers.values())
        metrics.export_replica_stats(stats, index_blocks, untrusted)
        metrics.export_replica_models({name: list(follower.stats) for name, follower in followers.items()})
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        bases = [model.card() for model in self.models.values()]
        adapters = [card for model in self.models.values() for card in await model.lora_cards()]
        return {"object": "list", "data": bases + adapters}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> Response:
        """Check the folder on one replica, as a replica checks its adapters at startup, then
        register it; each replica loads it when a request for it first reaches it
        (`workers/lora_registry.py` says why)."""
        model = self._lora_base(body.model)
        if body.lora_name in await self._served_names():
            raise bad_request(f"The lora adapter {body.lora_name!r} has already been loaded.", "lora_name")
        problem = await model.llm.lora_adapter_problem.remote(body.lora_name, body.lora_path)
        if problem is not None:
            raise bad_request(problem, "lora_path")
        if not await model.lora_registry.load.remote(body.lora_name, body.lora_path):
            raise bad_request(f"The lora adapter {body.lora_name!r} has already been loaded.", "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter {body.lora_name!r} added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> Response:
        """Unknown at once to every ingress replica; replicas drop their copy within
        `lora_registry.POLL_PERIOD_S` once no request of theirs runs under it. An adapter of
        `lora_modules` is unloaded like one loaded at run time."""
        for model in self.models.values():
            if model.lora_registry is not None and await model.lora_registry.unload.remote(body.lora_name):
                return PlainTextResponse(f"Success: LoRA adapter {body.lora_name!r} removed successfully.")
        raise unknown_lora(body.lora_name)

    @app.get("/version")
    async def version(self) -> dict:
        return {"version": package_version("kvserve")}

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> dict:
        """vLLM's: the token ids of a prompt or of chat messages (through the chat template),
        and the model's `max_model_len` to hold them against."""
        model, _ = await self._model(body.model)
        text = body.prompt if body.messages is None else model.chat_prompt(body)
        ids = await model.token_ids(text, body.special_tokens())
        strings = model.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids, "token_strs": strings}

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> dict:
        model, _ = await self._model(body.model)
        return {"prompt": await model.text_of(body.tokens, "tokens")}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        model, lora = await self._model(body.model)
        model.check_sampling_limits(body)
        prompts = await model.prepare(body.prompts(), body.cache_salt, lora.name if lora else None,
                                      body.add_special_tokens, body.truncate_prompt_tokens)
        asked = body.max_tokens if body.generates else 1  # the token the prompt's step samples anyway
        max_tokens = min(model.max_tokens(p.ids, asked) for p in prompts)
        sampling = body.sampling(max_tokens, body.logprobs)
        run, headers = await self._generation(model, lora, prompts, sampling, body, chat=False)
        if body.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
        return JSONResponse(await run.collect(), headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        _, run, headers = await self._chat(body)
        if body.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
        return JSONResponse(await run.collect(), headers=headers)

    @app.post("/v1/responses")
    async def responses(self, body: ResponsesRequest) -> Response:
        """OpenAI's Responses API, run as the chat completion it amounts to (after the stored
        conversation of `previous_response_id`), kept in the store unless `store` is false."""
        history = []
        if body.previous_response_id is not None:
            history = await self._stored("conversation", body.previous_response_id, "previous_response_id")
        model, run, headers = await self._chat(body.chat_request(history))
        builder = ResponseBuilder(body, run.model_name, model.token_count)

        async def keep(response: dict) -> None:
            store = await self._response_store()
            await store.put.remote(response, body.conversation(history, response["output"]))

        if body.stream:
            return StreamingResponse(builder.events(run.chunks(), keep if body.store else None),
                                     media_type="text/event-stream", headers=headers)
        response = builder.from_chat(await run.collect())
        if body.store:
            await keep(response)
        return JSONResponse(response, headers=headers)

    @app.post("/v1/messages")
    async def messages(self, body: MessagesRequest) -> Response:
        """Anthropic's Messages API, run as the chat completion it amounts to."""
        _, run, headers = await self._chat(body.chat_request())
        builder = MessageBuilder(run.model_name, run.usage.to_dict())
        if body.stream:
            return StreamingResponse(builder.events(run.chunks()), media_type="text/event-stream", headers=headers)
        return JSONResponse(builder.from_chat(await run.collect()), headers=headers)

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(self, body: TokenCountRequest) -> dict:
        """Anthropic's: the tokens of a Messages request's prompt, through the chat template."""
        chat = body.chat_request()
        model, _ = await self._model(chat.model)
        ids = await model.token_ids(model.chat_prompt(chat), chat.add_special_tokens)
        return {"input_tokens": len(ids)}

    @app.get("/v1/responses/{response_id}")
    async def stored_response(self, response_id: str) -> dict:
        return await self._stored("response", response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(self, response_id: str) -> dict:
        store = await self._response_store()
        if not await store.delete.remote(response_id):
            raise _not_stored(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def _stored(self, what: str, response_id: str, param: str | None = None):
        """The stored response `response_id`'s `what` ("response" or "conversation")."""
        store = await self._response_store()
        kept = await getattr(store, what).remote(response_id)
        if kept is None:
            raise _not_stored(response_id, param)
        return kept

    async def _response_store(self):
        if self.response_store is None:
            self.response_store = await get_or_create_store(self.app_name)
        return self.response_store

    async def _chat(self, body: ChatCompletionRequest) -> tuple[ServedModel, Generation, dict[str, str]]:
        model, lora = await self._model(body.model)
        model.check_sampling_limits(body)
        [prompt] = await model.prepare([model.chat_prompt(body)], body.cache_salt, lora.name if lora else None,
                                       body.add_special_tokens, body.truncate_prompt_tokens)
        sampling = body.sampling(model.max_tokens(prompt.ids, body.requested_max_tokens()), body.logprobs_count())
        sampling = model.after_thinking(sampling, prompt, body)
        return model, *await self._generation(model, lora, [prompt], sampling, body, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        model = await self._embedding_model(body.model)
        model.check_dimensions(body)
        results = await self._embed(model, body.inputs(), body, "embd")
        return JSONResponse(embeddings_body(model.name, results, body.encoding_format, body.dimensions,
                                            model.settings.normalize_embeddings))

    @app.post("/score")
    @app.post("/v1/score")
    async def score(self, body: ScoreRequest) -> Response:
        """vLLM's: the cosine similarity of the embeddings of each pair of texts."""
        model = await self._embedding_model(body.model)
        firsts, seconds = body.pairs()
        texts = list(dict.fromkeys(firsts + seconds))  # each text embedded once
        results = dict(zip(texts, await self._embed(model, texts, body, "score")))
        scores = [cosine(results[a].embedding, results[b].embedding) for a, b in zip(firsts, seconds)]
        return JSONResponse(score_body(model.name, scores, list(results.values())))

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(self, body: RerankRequest) -> Response:
        """vLLM's (Jina's, Cohere's): the documents by the cosine similarity of their embedding
        with the query's, best first."""
        model = await self._embedding_model(body.model)
        query, *documents = await self._embed(model, [body.query, *body.documents], body, "rerank")
        scores = [cosine(query.embedding, document.embedding) for document in documents]
        return JSONResponse(rerank_body(model.name, body.documents, scores, body.top_n, [query, *documents]))

    async def _embedding_model(self, name: str | None) -> ServedModel:
        model, lora = await self._model(name)
        if lora is not None:
            raise bad_request(f"{lora.name!r} is a LoRA adapter: adapters serve completions and chat, "
                              f"not embeddings (use the base model {model.name!r})", "model")
        return model

    async def _embed(self, model: ServedModel, texts: list[str | list[int]], body, kind: str) -> list[EmbeddingOutput]:
        """The embedding of each text, in order (`body`: its cache salt, priority and truncation)."""
        prompts = await model.prepare(texts, body.cache_salt, keep_last=body.truncate_prompt_tokens)
        model.ensure_follower()
        request_id = f"{kind}-{uuid.uuid4().hex}"
        embeds = [model.embed(f"{request_id}-{i}", prompt, body.cache_salt, body.priority)
                  for i, prompt in enumerate(prompts)]
        results = await asyncio.gather(*embeds, return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure if isinstance(failure, OpenAIError) else engine_error(failure) from failure
        return results

    # -- generation --------------------------------------------------------------------

    async def _generation(self, model: ServedModel, lora: LoRAChoice | None, prompts, sampling: SamplingParams, body,
                          chat: bool) -> tuple[Generation, dict[str, str]]:
        """The request's prompts started on their replicas, and the headers of the answer."""
        model.ensure_follower()
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        starts = [model.start(f"{request_id}-{i}", prompt, sampling, body, lora) for i, prompt in enumerate(prompts)]
        timers = [RequestTimer(model.name) for _ in starts]
        started = await asyncio.gather(*starts, return_exceptions=True)
        failures = [s for s in started if isinstance(s, BaseException)]
        if failures:
            for s in started:
                if not isinstance(s, BaseException):
                    s[0].cancel()
            error = engine_error(failures[0])
            metrics.REQUESTS.labels(model.name, "", error.code or error.type).inc(len(starts))
            raise error from failures[0]
        streams, firsts = [s for s, _ in started], [f for _, f in started]
        replicas = [f.replica for f in firsts]
        headers = {REPLICA_HEADER: ",".join(dict.fromkeys(replicas))}
        reader = body.tool_call_reader(model.tool_format) if chat else None
        run = Generation(lora.name if lora else model.name, model.token_text, request_id, body, chat, prompts, firsts,
                         streams, timers, reader, model.settings.reasoning_parser if chat else None,
                         model.thinking_tags)
        return run, headers
