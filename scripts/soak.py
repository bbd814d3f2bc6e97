"""Soak: thousands of streamed completions against a local kvserve on loopback, some clients
disconnecting mid-stream and some cancelling before the first byte; then checks that no KV
block leaked, no sequence is stuck and the replicas' resident memory stayed flat after
warm-up. Bounded in count (--requests) and time (--max-seconds).

    .venv/bin/python scripts/soak.py [--requests 2000] [--concurrency 32] [--max-seconds 240]
"""

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from kvserve.cluster.app import build_app
from kvserve.cluster.config import load_config
from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.workers.models.distributed import free_port

APP = "soak"
IDLE_NAMES = ("kvserve_kv_cache_usage_ratio", "kvserve_num_requests_running", "kvserve_num_requests_waiting")


def start(replicas: int) -> str:
    model = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "llama", "llama")
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    config = load_config(None, {
        "engine": {"model": str(model), "device": "cpu", "dtype": "float32", "num_kv_blocks": 256,
                   "max_model_len": 256},
        "serving": {"app_name": APP, "replicas": replicas, "replica_cpus": 0.5, "port": port},
    })
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def replica_pids() -> list[int]:
    pids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA") and "LLMServer" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pids.append(ray.get(handle.__ray_call__.remote(lambda self: os.getpid())))
    return pids


def rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def gauges(base: str) -> dict[str, float]:
    """Each idle gauge summed over the replicas."""
    text = httpx.get(f"{base}/metrics").text
    return {name: sum(float(v) for v in re.findall(rf'^{name}{{replica="[^"]+"}} (\S+)$', text, re.M))
            for name in IDLE_NAMES}


async def one_request(client: httpx.AsyncClient, base: str, rng: random.Random) -> str:
    """Streams one completion; returns how it ended."""
    behaviour = rng.choices(["complete", "disconnect", "cancel"], weights=[8, 1, 1])[0]
    body = {"prompt": [rng.randrange(10, 500) for _ in range(rng.randrange(8, 96))],
            "max_tokens": rng.randrange(4, 64), "stream": True, "ignore_eos": True}
    if behaviour == "cancel":
        task = asyncio.create_task(client.post(f"{base}/v1/completions", json=body))
        await asyncio.sleep(rng.uniform(0, 0.05))
        task.cancel()
        return "cancelled"
    async with client.stream("POST", f"{base}/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return f"http {reply.status_code}"
        async for line in reply.aiter_lines():
            if behaviour == "disconnect":
                return "disconnected"
            if line.startswith('data: {"error"'):
                return "error event"
    return "completed"


async def soak(base: str, requests: int, concurrency: int, max_seconds: float, samples: list) -> dict:
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    pending = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    async def worker(client):
        for _ in pending:
            if time.monotonic() > deadline:
                return
            outcome = await one_request(client, base, rng)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def sample_memory(pids, stop: asyncio.Event):
        while not stop.is_set():
            samples.append((sum(outcomes.values()), sum(rss_mb(p) for p in pids)))
            await asyncio.sleep(2)

    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(replica_pids(), stop))
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    stop.set()
    await sampler
    return outcomes


def wait_idle(base: str, timeout_s: float = 15) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while any(gauges(base).values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return gauges(base)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=240)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    base = start(args.replicas)
    samples: list[tuple[int, float]] = []
    started = time.monotonic()
    try:
        outcomes = asyncio.run(soak(base, args.requests, args.concurrency, args.max_seconds, samples))
        idle = wait_idle(base)
    finally:
        serve.shutdown()
        ray.shutdown()
    done = sum(outcomes.values())
    warm = [mb for n, mb in samples if n >= done // 5]  # after the first fifth: warm-up
    figures = {
        "requests": done, "seconds": round(time.monotonic() - started, 1), "outcomes": outcomes,
        "idle_gauges_after": idle,
        "replica_rss_mb": {"after_warmup": round(warm[0], 1), "end": round(warm[-1], 1),
                           "max": round(max(warm), 1)} if warm else None,
    }
    print(json.dumps(figures, indent=1))
    leaked = any(idle.values())
    grew = warm and warm[-1] > warm[0] * 1.05
    stuck = any(o not in ("completed", "disconnected", "cancelled", "http 429") for o in outcomes)
    return 1 if leaked or grew or stuck else 0


if __name__ == "__main__":
    sys.exit(main())
