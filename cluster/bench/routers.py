"""`kvserve bench routers`: every routing policy on the same local Ray cluster, one after the
other, under the same workloads; a table of the results and a PNG plot."""

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvserve.cluster.bench import serve as bench_serve
from kvserve.router.options import POLICIES
from kvserve.workers.models.distributed import free_port

WORKLOADS = ["shared-prefix", "multi-turn", "random"]


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS)
    parser.add_argument("--kv-blocks", type=int, default=160, help="KV pool of each replica, in blocks")
    parser.add_argument("--out", default="bench-routers", help="prefix of the .jsonl and .png written")
    for flag, default in (("--rate", 3.0), ("--num-requests", 96), ("--prompt-len", 48), ("--prefix-len", 320),
                          ("--groups", 16), ("--output-len", 16),
                          ("--max-history", 1536), ("--system-len", 0)):
        parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.5)
    parser.add_argument("--bench-seed", type=int, default=0)


def _wait_ready(url: str, replicas: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/ready", timeout=5)
            if reply.status_code == 200 and len(reply.json()["replicas"]) >= replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not become ready with {replicas} replicas")


def main(args: argparse.Namespace, model: str) -> int:
    import ray
    from ray import serve

    from kvserve.cluster.app import build_app
    from kvserve.cluster.config import load_config

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2 * args.replicas + 2, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    jsonl = Path(f"{args.out}.jsonl")
    jsonl.unlink(missing_ok=True)
    summaries = []
    try:
        for policy in args.policies:
            config = load_config(None, {
                "engine": {"model": model, "device": "cpu", "dtype": "float32", "cpu_threads": 1,
                           "num_kv_blocks": args.kv_blocks, "max_model_len": 2048, "block_size": args.block_size},
                "serving": {"app_name": "bench", "replicas": args.replicas, "router": policy, "port": port,
                            "replica_cpus": 1, "max_ongoing_requests": 256},
            })
            serve.run(build_app(config), name="bench", route_prefix="/")
            _wait_ready(url, args.replicas)
            _warm_up(url, args.replicas)
            for workload in args.workloads:
                run = argparse.Namespace(**{**vars(args), "url": url, "workload": workload,
                                            "label": f"{policy}/{workload}"})
                summary = _run_workload(run)
                summary["policy"] = policy
                bench_serve.print_table(summary)
                summaries.append(summary)
                with jsonl.open("a") as out:
                    out.write(json.dumps(summary) + "\n")
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    print_comparison(summaries)
    bench_serve.plot(summaries, f"{args.out}.png")
    return 0


def _warm_up(url: str, replicas: int) -> None:
    """A few concurrent throwaway requests, so that no measured request pays a replica's first
    forward passes. Their token ids are outside every workload's prompts (those start at 10)."""
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

    def body(i: int) -> dict:
        prompt = [3 + i % 7, 3 + (i // 7) % 7] * 16  # distinct, so no policy piles them up
        return {"model": model, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}

    async def send_all() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body(i)) for i in range(4 * replicas)))

    asyncio.run(send_all())


def _run_workload(args: argparse.Namespace) -> dict:
    models = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"]
    prompts = bench_serve.make_prompts(args, models[0]["vocab_size"])
    decided_before = routing_decisions(args.url)
    results, elapsed = asyncio.run(bench_serve.run_load(args, prompts, models[0]["id"]))
    summary = bench_serve.summarize(args, results, elapsed, bench_serve.oracle_hit_rate(prompts, args.block_size))
    summary["decisions"] = dict(routing_decisions(args.url) - decided_before)
    return summary


def routing_decisions(url: str) -> Counter:
    """The ingress's routing decisions so far, by reason."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return Counter({
        sample.labels["reason"]: int(sample.value)
        for family in text_string_to_metric_families(text) if family.name == "kvserve_routing_decisions"
        for sample in family.samples if sample.name.endswith("_total")
    })


def print_comparison(summaries: list[dict]) -> None:
    print("\n| workload | policy | hit rate (oracle) | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | E2E p50 ms "
          "| req/s | goodput req/s | refused | decisions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sorted(summaries, key=lambda s: (s["workload"], POLICIES.index(s["policy"]))):
        print(f"| {s['workload']} | {s['policy']} | {s['prefix_hit_rate']:.3f} ({s['oracle_hit_rate']:.3f}) "
              f"| {s['ttft']['p50'] * 1e3:.0f} | {s['ttft']['p99'] * 1e3:.0f} | {s['tpot']['p50'] * 1e3:.1f} "
              f"| {s['e2e']['p50'] * 1e3:.0f} | {s['request_throughput']:.2f} | {s['goodput']:.2f} | {s['refused']} "
              f"| {', '.join(f'{reason} {n}' for reason, n in sorted(s['decisions'].items()))} |")
