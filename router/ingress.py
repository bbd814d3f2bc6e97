"""The front door: OpenAI-compatible HTTP on FastAPI through `serve.ingress`.

A request's `model` picks one of the served models (`served_model.py`), which validates,
applies the chat template, tokenizes once, hashes the prompt's blocks with the engine's own
function, and hands token ids to its LLMServer deployment. The ingress never runs a model.
"""

import asyncio
import uuid

from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from kvserve.router import routing_metrics as metrics
from kvserve.router.errors import OpenAIError, engine_error, unknown_model
from kvserve.router.generation import Generation, RequestTimer
from kvserve.router.http_app import ApiKeyGate, app
from kvserve.router.openai_schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from kvserve.router.responses import embeddings_body
from kvserve.router.served_model import IngressSettings, ServedModel
from kvserve.workers.protocol import SamplingParams

REPLICA_HEADER = "x-kvserve-replica"


@serve.ingress(app)
class Ingress:
    def __init__(self, models: list[IngressSettings], llm: DeploymentHandle | None = None):
        """`llm`: the deployment of the one model, in this application. Without it, each model
        runs in an application of its own (`served_model.model_app_name`)."""
        front_door = models[0]  # its settings come from the cluster's serving, the same for every model
        app.state.max_request_bytes = front_door.max_request_bytes
        if front_door.api_key is not None:
            app.state.api_key_gate = ApiKeyGate(f"Bearer {front_door.api_key}".encode(),
                                                front_door.metrics_need_api_key)
        self.app_name = serve.get_replica_context().app_name
        if llm is not None:
            served = [ServedModel(models[0], llm, self.app_name)]
        else:
            served = [ServedModel.in_own_app(settings, self.app_name) for settings in models]
        self.models = {model.name: model for model in served}

    def _model(self, name: str | None) -> ServedModel:
        """The model a request names; with a single model, also a request that names none."""
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise unknown_model(name, list(self.models))
        return self.models[name]

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
        return {"object": "list", "data": [model.card() for model in self.models.values()]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        model = self._model(body.model)
        model.check_sampling_limits(body)
        prompts = [model.tokenize(p) for p in body.prompts()]
        max_tokens = min(model.max_tokens(ids, body.max_tokens) for _, ids in prompts)
        sampling = body.sampling(max_tokens, body.logprobs)
        return await self._serve(model, prompts, sampling, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        model = self._model(body.model)
        model.check_sampling_limits(body)
        prompt = model.tokenize(model.chat_prompt(body), add_special_tokens=False)
        sampling = body.sampling(model.max_tokens(prompt[1], body.requested_max_tokens()), body.logprobs_count())
        return await self._serve(model, [prompt], sampling, body, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        model = self._model(body.model)
        model.check_dimensions(body)
        prompts = [model.tokenize(p) for p in body.inputs()]
        model.ensure_follower()
        request_id = f"embd-{uuid.uuid4().hex}"
        embeds = [model.embed(f"{request_id}-{i}", text, ids, body) for i, (text, ids) in enumerate(prompts)]
        results = await asyncio.gather(*embeds, return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure if isinstance(failure, OpenAIError) else engine_error(failure) from failure
        return JSONResponse(embeddings_body(model.name, results, body.encoding_format, body.dimensions,
                                            model.settings.normalize_embeddings))

    # -- generation --------------------------------------------------------------------

    async def _serve(self, model: ServedModel, prompts, sampling: SamplingParams, body, chat: bool) -> Response:
        model.ensure_follower()
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        starts = [model.start(f"{request_id}-{i}", text, ids, sampling, body) for i, (text, ids) in enumerate(prompts)]
        timers = [RequestTimer(model.name) for _ in starts]
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
        reader = body.tool_call_reader(model.tool_format) if chat else None
        run = Generation(model.name, model.token_text, request_id, body, chat, len(prompts), firsts, streams,
                         timers, reader)
        if body.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
        return JSONResponse(await run.collect(), headers=headers)
