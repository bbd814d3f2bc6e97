"""`LLMServer`: one engine per Ray Serve replica, stepping in its own thread.

Requests arrive through the Serve handle as token ids plus sampling settings and stream
their outputs back chunk by chunk. The engine thread owns the engine and only steps it; the
replica's event loop queues commands for it and turns each step's tokens into text and
deltas (the output processor) while the next step runs, so neither a long forward pass nor
detokenization holds up the other, or the replica's requests, health checks and stats.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from functools import partial

import ray
from ray import serve

from kvserve.workers.engine.block_hash import hash_check_value
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.engine import LLMEngine
from kvserve.workers.engine.output_processor import NewToken
from kvserve.workers.engine.outputs import RequestOutput
from kvserve.workers.kv_event_hub import KVEventHub, hub_name, hub_of
from kvserve.workers.app_actors import app_actor
from kvserve.workers.lora_registry import POLL_PERIOD_S, get_or_create_registry
from kvserve.workers.models.lora_adapter import check_adapter
from kvserve.workers.protocol import (
    HEARTBEAT_PERIOD_S, EmbeddingOutput, EmbedRequest, EngineStats, GenerateRequest, Heartbeat, OutputDelta,
    ReplicaRegistration, RequestRefused, SampleDelta,
)
from kvserve.workers.runner import start_engine

logger = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's own log file

STATS_PERIOD_S = HEARTBEAT_PERIOD_S
PUBLISH_PERIOD_S = 0.05  # the shortest time between two publishes while requests run (see `_publish`)


def get_or_create_hub(app_name: str, hub_number: int = 0):
    """The application's hub actor number `hub_number` (`app_actor`)."""
    hub, registered = app_actor(KVEventHub, hub_name(app_name, hub_number), max_concurrency=1000)
    ray.get(registered)
    return hub


def output_delta(output: RequestOutput, replica: str) -> OutputDelta:
    """One streamed update of a request: what each sample added in the last step (the
    outputs of a processor without snapshots, whose logprobs are the step's)."""
    return OutputDelta(
        replica=replica,
        num_prompt_tokens=len(output.prompt_token_ids),
        num_cached_tokens=output.num_cached_tokens,
        samples=[
            SampleDelta(
                index=o.index,
                text=o.delta_text,
                token_ids=o.delta_token_ids,
                logprobs=o.logprobs or None,
                finish_reason=o.finish_reason,
                stop_reason=o.stop_reason,
            )
            for o in output.outputs
            if o.delta_token_ids or o.finish_reason
        ],
        finished=output.finished,
        prompt_logprobs=output.prompt_logprobs,
    )


def drop_unloaded_loras(registered: dict[str, str], engine: LLMEngine) -> None:
    """Remove the engine's adapters that are not `registered` (unloaded, those of `lora_modules`
    too); one a request still runs under stays (the engine refuses), for the next poll."""
    for name in [n for n in engine.lora_folders if n not in registered]:
        try:
            engine.remove_lora(name)
        except ValueError:
            pass


class EngineThread(threading.Thread):
    """Runs the engine: applies queued commands, steps while there is work, publishes.

    Every pass of the loop beats (`beat`); an idle loop still beats each STATS_PERIOD_S, so a
    loop that has not beaten for `step_timeout_s` is stuck in a step or elsewhere."""

    def __init__(self, engine: LLMEngine, replica_id: str, deliver, post, publish, step_timeout_s: float):
        super().__init__(name="kvserve-engine", daemon=True)
        self.engine = engine
        self.replica_id = replica_id  # the name its refusals carry
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.deliver = deliver
        self.post = post  # (request id, item): an error, a refusal or an embedding for its stream
        self.publish = publish
        self.step_timeout_s = step_timeout_s
        self.error: BaseException | None = None
        self.beat = time.monotonic()
        self._stopping = False

    def submit(self, command) -> None:
        self.commands.put(command)

    def stop(self) -> None:
        self._stopping = True
        self.commands.put(lambda engine: None)

    def problem(self) -> str | None:
        """Why this engine cannot serve, or None while it can."""
        if self.error is not None:
            return f"its engine failed: {self.error!r}"
        if not self.is_alive():
            return "its engine loop has stopped"
        stalled = time.monotonic() - self.beat
        if stalled > self.step_timeout_s:
            return f"its engine made no progress for {stalled:.0f} s (serving.step_timeout_s {self.step_timeout_s:g})"
        return None

    def run(self) -> None:
        try:
            while not self._stopping:
                block = not self.engine.has_unfinished_requests()
                self._apply_commands(block)
                if self.engine.has_unfinished_requests():
                    self._step()
                self.publish(self.engine)
                self.beat = time.monotonic()
        except BaseException as error:  # the replica reports unhealthy and Serve replaces it
            logger.exception("engine thread died")
            self.error = error

    def _step(self) -> None:
        try:
            tokens = self.engine.step_tokens()
        except Exception as error:
            logger.exception("engine step failed")
            self._fail_all(error)
            return
        if tokens:
            self.deliver(tokens)
        for request_id, reason in self.engine.take_refusals():
            self.post(request_id, RequestRefused(reason, overloaded=False, replica=self.replica_id))
        for request_id, reason in self.engine.take_failures():
            self.post(request_id, RuntimeError(f"the model failed this request: {reason}"))
        for embedding in self.engine.take_embeddings():
            self.post(embedding.request_id, embedding)

    def _fail_all(self, error: Exception) -> None:
        """Fail every request the engine holds with the step's error; if that does not leave
        the engine empty, its state is lost: stop, and the replica reports unhealthy."""
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self.post(request_id, RuntimeError(f"the engine step failed: {error!r}"))
        stats = self.engine.stats()
        if stats.running or stats.waiting or stats.kv_blocks_used:
            raise RuntimeError(f"engine state lost after a failed step ({error!r}): {stats}") from error

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self.commands.get(timeout=STATS_PERIOD_S) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command(self.engine)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return


class LLMServer:
    """The Serve deployment class (the application builder applies `serve.deployment`)."""

    def __init__(self, engine_config: EngineConfig, step_timeout_s: float, kv_event_hubs: int = 1):
        self.engine = start_engine(engine_config)
        self.outputs = self.engine.detach_outputs()  # run on this replica's event loop
        self.hash_check = hash_check_value(self.engine.config.block_size)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self.hub_number = hub_of(self.replica_id, kv_event_hubs)
        self.hub = get_or_create_hub(self.app_name, self.hub_number)
        self._register()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop = asyncio.get_event_loop()
        self._last_published_at = 0.0
        self.lora_registry = (get_or_create_registry(self.app_name, engine_config.lora_modules)
                              if engine_config.enable_lora else None)
        self._last_lora_poll_at = 0.0
        self._resync = False
        self._hub_lost = False
        self.thread = EngineThread(self.engine, self.replica_id, self._deliver, self._post, self._publish, step_timeout_s)
        self.thread.start()

    def _register(self, stats: EngineStats | None = None) -> None:
        """Join the hub, or join it again from a snapshot (after a lost batch or a hub restart)."""
        snapshot = self.engine.cached_blocks()
        self._kv_epoch, self._kv_seq = snapshot.epoch, snapshot.seq
        heartbeat = Heartbeat(snapshot.epoch, snapshot.seq, time.time(), stats or self.engine.stats())
        registration = ReplicaRegistration(
            self.replica_id, self.engine.config.block_size, self.hash_check,
            ray.get_runtime_context().current_actor, snapshot, heartbeat,
        )
        self.hub.register.remote(registration)

    # -- engine thread side --------------------------------------------------------------

    def _deliver(self, tokens: list[NewToken]) -> None:
        self._loop.call_soon_threadsafe(self._process, tokens)

    def _post(self, request_id: str, item: Exception | RequestRefused | EmbeddingOutput) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, item)

    def _publish(self, engine: LLMEngine) -> None:
        """Send the KV events taken since the last publish, with a heartbeat (position in the
        event stream and load): at most every PUBLISH_PERIOD_S while requests run (on a GPU a
        step that stores blocks comes every few ms, and one call per step from every replica
        is more than the application's one hub can take; each call costs this thread too),
        at once when the engine falls idle, and at least every STATS_PERIOD_S."""
        now = time.monotonic()
        if now - self._last_published_at < PUBLISH_PERIOD_S and engine.has_unfinished_requests():
            return
        batch = engine.take_kv_events()
        if batch is None and now - self._last_published_at < STATS_PERIOD_S:
            return
        self._last_published_at = now
        stats = engine.stats()
        if self._resync:
            self._rejoin(stats)
            return
        if batch is not None:
            self._kv_seq = batch.seq
        heartbeat = Heartbeat(self._kv_epoch, self._kv_seq, time.time(), stats)
        ref = self.hub.publish.remote(self.replica_id, [batch] if batch else [], heartbeat)
        ref.future().add_done_callback(self._on_published)
        self._poll_lora_registry(now)

    def _poll_lora_registry(self, now: float) -> None:
        """Drop the adapters loaded at run time that the registry no longer has (unloaded). One
        with requests in flight stays until they finish: the engine refuses, the next poll retries."""
        if self.lora_registry is None or now - self._last_lora_poll_at < POLL_PERIOD_S:
            return
        self._last_lora_poll_at = now

        self.lora_registry.folders.remote().future().add_done_callback(self._on_lora_folders)

    def _on_lora_folders(self, future) -> None:
        if future.exception() is None:  # else the registry is gone with Serve: nothing to drop against
            self.thread.submit(partial(drop_unloaded_loras, future.result()))

    def _rejoin(self, stats: EngineStats) -> None:
        """Register again from a snapshot, with a new hub if the old one is gone."""
        if self._hub_lost:
            try:
                self.hub = get_or_create_hub(self.app_name, self.hub_number)
            except Exception as error:  # Serve's controller is restarting: try again next period
                logger.warning("KV event hub not reachable: %r", error)
                return
            self._hub_lost = False
        self._resync = False
        self._register(stats)

    def _on_published(self, future) -> None:
        try:
            accepted = future.result()
        except Exception:  # the hub is gone: join a new one from a snapshot
            self._hub_lost = True
            accepted = False
        if not accepted:
            self._resync = True

    # -- replica side --------------------------------------------------------------------

    def _process(self, tokens: list[NewToken]) -> None:
        """One step's tokens -> a delta on each stream they changed; samples a stop string
        ended go back to the engine to be stopped."""
        outputs, stopped = self.outputs.process(tokens)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output_delta(output, self.replica_id))
        if stopped:
            self.thread.submit(lambda engine: engine.stop_samples(stopped))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[OutputDelta | RequestRefused]:
        """Stream the outputs of one request, one delta per engine step that changed it."""
        self._raise_if_dead()
        request_id = request.request_id
        hashes = request.block_hashes if request.hash_check == self.hash_check else None
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self.outputs.add_request(request_id, None, request.prompt_token_ids, request.sampling)

        def add(engine: LLMEngine) -> None:
            try:
                if request.lora_path is not None:  # the registry's: this replica may not have it yet
                    engine.add_lora(request.lora_name, request.lora_path)
                engine.add_request(request_id, request.prompt_token_ids, request.sampling, request.priority,
                                   request.cache_salt, block_hashes=hashes, kv_retention=request.kv_retention,
                                   lora_name=request.lora_name)
            except ValueError as error:  # the request's own problem, not an error of ours
                self._loop.call_soon_threadsafe(stream.put_nowait, RequestRefused.of(error, self.replica_id))

        finished = False
        try:
            self.thread.submit(add)
            while not finished:
                delta = await self._next_delta(stream)
                if isinstance(delta, RequestRefused):
                    logger.info("request %s refused: %s", request_id, delta.reason)
                    finished = True
                else:
                    finished = delta.finished
                yield delta
        finally:
            self._streams.pop(request_id, None)
            self.outputs.abort(request_id)
            if not finished:
                self.thread.submit(lambda engine: engine.abort_request(request_id))

    async def embed(self, request: EmbedRequest) -> AsyncIterator[EmbeddingOutput | RequestRefused]:
        """The embedding of one prompt, prefilled on this replica's engine: one item, streamed as
        `generate` streams, so that the ingress sends both kinds of call and retries them alike."""
        self._raise_if_dead()
        request_id = request.request_id
        hashes = request.block_hashes if request.hash_check == self.hash_check else None
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream

        def add(engine: LLMEngine) -> None:
            try:
                engine.add_embedding_request(request_id, request.prompt_token_ids, request.priority,
                                             request.cache_salt, block_hashes=hashes)
            except ValueError as error:
                self._loop.call_soon_threadsafe(stream.put_nowait, RequestRefused.of(error, self.replica_id))

        answer = None
        try:
            self.thread.submit(add)
            answer = await self._next_delta(stream)
            yield answer
        finally:
            self._streams.pop(request_id, None)
            if answer is None:
                self.thread.submit(lambda engine: engine.abort_request(request_id))

    async def _next_delta(self, stream: asyncio.Queue) -> OutputDelta | RequestRefused:
        """The next delta; raises the request's own failure, or the engine's once it cannot serve."""
        while True:
            try:
                item = await asyncio.wait_for(stream.get(), timeout=1.0)
            except asyncio.TimeoutError:
                self._raise_if_dead()
                continue
            if isinstance(item, Exception):
                raise item
            return item

    def _raise_if_dead(self) -> None:
        problem = self.thread.problem()
        if problem is not None:
            raise RuntimeError(f"replica {self.replica_id} cannot serve: {problem}")

    def lora_adapter_problem(self, name: str, folder: str) -> str | None:
        """Why `folder` cannot be adapter `name` of this model, or None (the checks of startup)."""
        try:
            check_adapter(name, folder, self.engine.runner.model_config, self.engine.config.max_lora_rank)
        except (ValueError, OSError) as error:
            return str(error)
        return None

    async def check_health(self) -> None:
        self._raise_if_dead()
        await self.engine.runner.check_health()

    def __del__(self):
        thread = getattr(self, "thread", None)
        if thread is not None:
            thread.stop()
        hub = getattr(self, "hub", None)
        if hub is not None:
            hub.unregister.remote(self.replica_id)
