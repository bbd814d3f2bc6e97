"""Overload and faults on a real local Ray cluster: a full queue, a killed replica, a step
that raises, a wedged engine, a burst far beyond capacity, and a replica behind its
max_queue_wait_s.

Faults are injected by `FaultyServer`, an `LLMServer` whose model raises, never returns,
slows down or gives NaN logits on prompts that start with a marker; the rest of the
application (ingress, router, deployment options) is `build_app`'s own. `build_app` is handed
the subclass by swapping the name it deploys in this driver only: Serve pickles the class it
is given, so the replicas run the subclass and nothing in the package changes."""

import asyncio
import json
import re
import time

import httpx
import pytest
import ray
from ray import serve

import kvserve.cluster.app as app_module
from kvserve.cluster.app import build_app
from kvserve.cluster.config import load_config
from kvserve.workers.models.distributed import free_port

APP = "faults"
ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 96, "max_model_len": 128}
SERVING = {"app_name": APP, "replicas": 2, "replica_cpus": 0.5, "max_ongoing_requests": 8,
           "max_queued_requests": 8, "step_timeout_s": 3.0, "drain_timeout_s": 10.0}
FAIL = [3, 1, 4, 1]  # prompts starting with these make the step raise
HANG = [2, 7, 1, 8]  # ... or never return
SLOW = [1, 6, 1, 8]  # ... or take 20 ms
NAN = [3, 5, 8, 9]  # ... or give NaN logits for the third output token


def faulty_server_class():
    """Defined in a function so that Ray pickles it by value: the tests folder is no package."""
    import threading
    import time

    from kvserve.workers.server import LLMServer

    class FaultyServer(LLMServer):
        def __init__(self, *args):
            super().__init__(*args)
            execute = self.engine.runner.execute

            def faulty_execute(step):
                markers = {tuple(seq.token_ids[:4]) for seq in step.batch.seqs}
                if (3, 1, 4, 1) in markers:
                    raise RuntimeError("injected step failure")
                if (2, 7, 1, 8) in markers:
                    threading.Event().wait()
                if (1, 6, 1, 8) in markers:
                    time.sleep(0.02)
                return execute(step)

            self.engine.runner.execute = faulty_execute
            sample = self.engine.runner.sampler.sample

            def nan_sample(logits, rows, *rest):
                for i, row in enumerate(rows):
                    if tuple(row.token_ids[:4]) == (3, 5, 8, 9) and len(row.token_ids) - row.num_prompt_tokens == 2:
                        logits[i] = float("nan")
                return sample(logits, rows, *rest)

            self.engine.runner.sampler.sample = nan_sample

    return FaultyServer


@pytest.fixture(scope="module")
def server(tiny_checkpoints, ray_of):
    port = free_port()
    config = load_config(None, {"engine": {**ENGINE, "model": str(tiny_checkpoints["llama"])},
                                "serving": {**SERVING, "port": port}})
    with ray_of(4):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(app_module, "LLMServer", faulty_server_class())
            serve.run(build_app(config), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_for_replicas(base)
        yield base


def running_replicas() -> int:
    states = serve.status().applications[APP].deployments["LLMServer"].replica_states
    return states.get("RUNNING", 0) if sum(states.values()) == states.get("RUNNING", 0) else 0


def wait_for_replicas(base: str, timeout_s: float = 90) -> None:
    """Both replicas running and known to the router."""
    deadline = time.monotonic() + timeout_s
    while (running_replicas() != 2 or len(replica_actors()) != 2
           or not set(replica_actors()) <= set(metric(base, "kvserve_kv_cache_usage_ratio"))):
        assert time.monotonic() < deadline, f"replicas not back: {serve.status().applications[APP]}"
        time.sleep(0.5)


def replica_actors() -> dict[str, object]:
    """Replica id -> the Serve replica actor."""
    actors = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA") and "LLMServer" in a["name"]:
            actors[a["name"].split("#")[-1]] = ray.get_actor(a["name"], namespace=a["namespace"])
    return actors


def body(prompt, max_tokens: int, stream: bool) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


async def stream_events(client: httpx.AsyncClient, base: str, prompt, max_tokens: int) -> tuple[int, list, dict]:
    """(status, SSE payloads up to [DONE], headers) of one streamed completion."""
    async with client.stream("POST", f"{base}/v1/completions", json=body(prompt, max_tokens, True)) as reply:
        if reply.status_code != 200:
            return reply.status_code, [json.loads(await reply.aread())], dict(reply.headers)
        events = [json.loads(line[6:]) async for line in reply.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        return 200, events, dict(reply.headers)


def metric(base: str, name: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {m[0]: float(m[1]) for m in re.findall(rf'^{name}{{replica="([^"]+)"}} (\S+)$', text, re.M)}


def wait_until_idle(base: str, timeout_s: float = 10) -> None:
    """No request running or waiting and no KV block in use on any replica."""
    deadline = time.monotonic() + timeout_s
    names = ("kvserve_kv_cache_usage_ratio", "kvserve_num_requests_running", "kvserve_num_requests_waiting")
    while any(v > 0 for name in names for v in metric(base, name).values()):
        assert time.monotonic() < deadline, {name: metric(base, name) for name in names}
        time.sleep(0.3)


def test_past_the_queue_limit_requests_get_429_with_retry_after(server):
    async def flood():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream_events(client, server, [10 + i] * 8, 60) for i in range(40)))

    results = asyncio.run(flood())
    refused = [(events[0], headers) for status, events, headers in results if status == 429]
    assert refused and all(status in (200, 429) for status, _, _ in results)
    error, headers = refused[0]
    assert headers["retry-after"] == "1"
    assert error["error"]["code"] == "rate_limit_exceeded" and error["error"]["type"] == "requests"
    assert all("error" not in e for status, events, _ in results if status == 200 for e in events)
    wait_until_idle(server)


def test_a_killed_replica_ends_its_streams_and_fresh_requests_go_elsewhere(server):
    wait_for_replicas(server)
    prefix = list(range(20, 52))

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{server}/v1/completions", json=body(prefix + [5], 90, True)) as reply:
                assert reply.status_code == 200, await reply.aread()
                victim = reply.headers["x-kvserve-replica"]
                lines = reply.aiter_lines()
                await anext(lines)
                ray.kill(replica_actors()[victim], no_restart=True)
                killed_at = time.monotonic()
                # same prefix: the KV router sends these to the victim until it learns of its death
                fresh = [asyncio.create_task(client.post(f"{server}/v1/completions", json=body(prefix + [i], 4, False)))
                         for i in range(6)]
                rest = [line async for line in lines if line.startswith("data: ")]
                ended_after = time.monotonic() - killed_at
            return victim, rest, ended_after, await asyncio.gather(*fresh)

    victim, rest, ended_after, fresh = asyncio.run(scenario())
    assert ended_after < 5
    error = json.loads(rest[-2][6:])["error"]
    assert "replica serving this request stopped" in error["message"] and rest[-1] == "data: [DONE]"
    assert [r.status_code for r in fresh] == [200] * 6, [r.text for r in fresh]
    assert all(r.headers["x-kvserve-replica"] != victim for r in fresh)
    deadline = time.monotonic() + 60
    while victim in replica_actors():
        assert time.monotonic() < deadline, "the killed replica is still listed"
        time.sleep(0.5)
    wait_for_replicas(server)


def test_a_step_that_raises_fails_its_requests_and_the_replica_serves_on(server):
    wait_for_replicas(server)
    before = set(replica_actors())
    reply = httpx.post(f"{server}/v1/completions", json=body(FAIL + [9] * 4, 8, False), timeout=30)
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "internal_error" and "injected step failure" in error["message"]
    time.sleep(5)  # two health-check periods: a replica reporting unhealthy would be replaced by now
    assert set(replica_actors()) == before and running_replicas() == 2
    for i in range(4):
        assert httpx.post(f"{server}/v1/completions", json=body([30 + i] * 8, 4, False), timeout=30).status_code == 200
    wait_until_idle(server)


def failed_requests(base: str) -> float:
    """kvserve_requests_total of requests that ended in an internal error, over all replicas."""
    text = httpx.get(f"{base}/metrics").text
    return sum(float(v) for v in re.findall(r'^kvserve_requests_total\{[^}]*status="internal_error"[^}]*\} (\S+)$',
                                            text, re.M))


def test_nan_logits_fail_their_request_alone_and_the_replica_serves_on(server):
    wait_for_replicas(server)
    before = set(replica_actors())
    failed = failed_requests(server)

    async def together():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                client.post(f"{server}/v1/completions", json=body(NAN + [9] * 4, 8, False)),
                *(client.post(f"{server}/v1/completions", json=body([40 + i] * 8, 12, False)) for i in range(4)))

    broken, *healthy = asyncio.run(together())
    assert broken.status_code == 500
    error = broken.json()["error"]
    assert error["type"] == "internal_error"
    assert "the model failed this request" in error["message"] and "output token 3 of sample 0 hold NaN" in error["message"]
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12 for r in healthy)
    assert failed_requests(server) == failed + 1  # counted though it failed after its first tokens
    assert set(replica_actors()) == before and running_replicas() == 2
    wait_until_idle(server)


def test_a_wedged_engine_fails_its_clients_by_the_deadline_and_is_replaced(server):
    wait_for_replicas(server)
    before = set(replica_actors())
    started = time.monotonic()
    reply = httpx.post(f"{server}/v1/completions", json=body(HANG + [9] * 4, 8, False), timeout=30)
    assert time.monotonic() - started < SERVING["step_timeout_s"] + 3
    assert reply.status_code == 500 and "no progress" in reply.json()["error"]["message"]
    deadline = time.monotonic() + 60
    while len(set(replica_actors()) - before) != 1:
        assert time.monotonic() < deadline, "the wedged replica was not replaced"
        time.sleep(0.5)
    wait_for_replicas(server)


def test_health_checks_answer_during_a_burst_and_every_request_ends_cleanly(server):
    wait_for_replicas(server)
    actors = list(replica_actors().values())
    health_waits = []

    async def check_health_meanwhile(burst: asyncio.Task):
        while not burst.done():
            started = time.monotonic()
            await asyncio.gather(*(a.check_health.remote() for a in actors))
            health_waits.append(time.monotonic() - started)
            await asyncio.sleep(0.2)

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            task = asyncio.create_task(asyncio.wait_for(asyncio.gather(
                *(stream_events(client, server, [40 + i % 200] * 12, 24) for i in range(150))), 150))
            await check_health_meanwhile(task)
            return await task

    results = asyncio.run(burst())
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 24
    for status, events, _ in results:
        if status == 200:
            assert "error" not in events[-1] and events[-1]["choices"][0]["finish_reason"] == "length"
    assert len(health_waits) >= 3 and max(health_waits) < 1.0, health_waits
    wait_until_idle(server)


def test_a_replica_behind_max_queue_wait_answers_503_with_retry_after_and_serves_its_queue(server, tiny_checkpoints):
    """A second application on the same Serve instance: one replica running one sequence at a
    time. While a slow answer runs, a second request waits; once it has waited past the
    engine's max_queue_wait_s, a third is refused at once, and the second is served. The
    router takes the refused send back: its retry finds no replica caching its prompt."""
    config = load_config(None, {
        "engine": {**ENGINE, "model": str(tiny_checkpoints["llama"]), "max_num_seqs": 1, "max_queue_wait_s": 0.5},
        "serving": {**SERVING, "app_name": "shedding", "replicas": 1, "port": int(server.rsplit(":", 1)[1])}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app_module, "LLMServer", faulty_server_class())
        serve.run(build_app(config), name="shedding", route_prefix="/shedding")
    base = f"{server}/shedding"

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", f"{base}/v1/completions", json=body(SLOW + [9] * 4, 115, True)) as slow:
                lines = slow.aiter_lines()  # kept: closed, it would close the stream
                await anext(lines)  # it runs, 20 ms a token
                waiting = asyncio.create_task(stream_events(client, base, [8] * 8, 4))
                await asyncio.sleep(1.0)
                refused = await stream_events(client, base, [7] * 40, 4)  # two full blocks
            waited = await waiting  # the slow answer is cut off: its client left
            uncached = uncached_decisions()
            retried = await stream_events(client, base, [7] * 40, 4)  # within the router's recent_s of the refusal
            return refused, waited, retried, uncached_decisions() - uncached

    def uncached_decisions() -> float:
        found = re.findall(r'^kvserve_routing_decisions_total{policy="kv",reason="no_cached_prefix"} (\S+)$',
                           httpx.get(f"{base}/metrics").text, re.M)
        return float(found[0]) if found else 0.0

    try:
        (status, events, headers), (waited_status, waited_events, _), (retried_status, _, _), retry_uncached = \
            asyncio.run(scenario())
        counted = re.findall(r'^kvserve_requests_total{model="\w+",replica="",status="server_overloaded"} (\S+)$',
                             httpx.get(f"{base}/metrics").text, re.M)
    finally:
        serve.delete("shedding")
    assert status == 503 and headers["retry-after"] == "1", (status, events)
    error = events[0]["error"]
    assert error["code"] == "server_overloaded" and error["type"] == "server_error"
    assert "max_queue_wait_s (0.5 s)" in error["message"] and counted == ["1.0"]
    assert waited_status == 200 and waited_events[-1]["choices"][0]["finish_reason"] == "length"
    assert retried_status == 200 and retry_uncached == 1.0


def test_deleting_the_app_lets_in_flight_streams_finish(server):
    """Last in this module: it takes the application down. A stream under way when Serve
    starts to shut the application down still runs to its end (serving.drain_timeout_s)."""
    wait_for_replicas(server)

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", f"{server}/v1/completions", json=body([9] * 8, 100, True)) as reply:
                lines = reply.aiter_lines()
                await anext(lines)
                deleting = asyncio.create_task(asyncio.to_thread(serve.delete, APP))
                rest = [line async for line in lines if line.startswith("data: ")]
            await deleting
        return rest

    rest = asyncio.run(scenario())
    chunks = [json.loads(line[6:]) for line in rest[:-1]]
    assert rest[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
