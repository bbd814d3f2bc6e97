"""`kvserve bench routers`: every routing policy on the same local Ray cluster, one after the
other, under the same workloads; a table of the results and a PNG plot.

Each policy runs in one or more cache setups (`Setup`): the device pool, the host-memory tier
and the `kv` policy's credit for it, so that a pool too small for the working set can be
measured with the tier off and on, and against a pool that holds everything, in one run.

The `lora` workload (not run by default) serves `--loras` random PEFT adapters on the base
model, each request under one of them with that adapter's system prompt; its setups for the
`kv` policy differ in `lora_load_cost_tokens` (0: the router ignores where adapters are).
`--cost-unit tokens seconds` runs the `kv` policy once with each `router_options.cost_unit`,
`--seed-idle-replicas on off` once with and once without `router_options.seed_idle_replicas`.
`--ingress N` serves through N ingress replicas, each routing its share of the requests as the
routers of a larger deployment do (the routing decisions by reason are then not counted:
each ingress replica's /metrics holds its own).

With `--trace-out`, each workload's requests (but the `lora` one's) are also written as a
Mooncake trace, for the simulator (`kvserve bench sim --trace`) to replay the same traffic."""

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvserve.cluster.bench import serve as bench_serve
from kvserve.cluster.bench.models import bench_lora_adapters
from kvserve.cluster.bench.sim.workloads import mooncake_from_prompts, write_mooncake
from kvserve.router.options import POLICIES, RouterOptions
from kvserve.workers.models.distributed import free_port

WORKLOADS = ["shared-prefix", "multi-turn", "random"]
LORA_WORKLOAD = "lora"
KV_BLOCKS, MAX_MODEL_LEN, BLOCK_SIZE = 160, 2048, 16  # a replica's engine, unless the flags say


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--ingress", type=int, default=1, help="ingress replicas, each a router of its own")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--workloads", nargs="+", choices=[*WORKLOADS, LORA_WORKLOAD], default=WORKLOADS)
    parser.add_argument("--kv-blocks", type=int, default=KV_BLOCKS, help="KV pool of each replica, in blocks")
    parser.add_argument("--kv-offload-gib", type=float, nargs="+", default=[0.0],
                        help="host-memory KV tier of each replica, each value a setup of its own (0: none)")
    parser.add_argument("--host-block-credit", type=float, nargs="+", default=[RouterOptions().host_block_credit],
                        help="kv policy: what a host-tier block saves against a device one, each value a setup of "
                        "its own where there is a host tier")
    parser.add_argument("--loras", type=int, default=8, help="lora workload: adapters served")
    parser.add_argument("--max-loras", type=int, default=2, help="lora workload: adapters on each replica's device")
    parser.add_argument("--lora-load-cost-tokens", type=int, nargs="+",
                        default=[RouterOptions().lora_load_cost_tokens],
                        help="kv policy, lora workload: the cost of loading an adapter, each value a setup of its own")
    parser.add_argument("--cost-unit", nargs="+", choices=["tokens", "seconds"], default=[RouterOptions().cost_unit],
                        help="kv policy: what its costs count, each value a setup of its own")
    parser.add_argument("--seed-idle-replicas", nargs="+", choices=["on", "off"],
                        default=["on" if RouterOptions().seed_idle_replicas else "off"],
                        help="kv policy: router_options.seed_idle_replicas, each value a setup of its own")
    parser.add_argument("--unbounded-kv-blocks", type=int,
                        help="also run each policy first with a pool this large and no host tier, the reference")
    parser.add_argument("--out", default="bench-routers", help="prefix of the .jsonl and .png written")
    parser.add_argument("--trace-out", metavar="PREFIX",
                        help="also write each workload's requests as a Mooncake trace, PREFIX-WORKLOAD.jsonl "
                        "(one hash id per --block-size tokens; timestamps are the planned send times)")
    for flag, default in (("--rate", 3.0), ("--num-requests", 96), ("--prompt-len", 48), ("--prefix-len", 320),
                          ("--groups", 16), ("--output-len", 16),
                          ("--max-history", 1536), ("--system-len", 0)):
        parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE)
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN,
                        help="the engine's; the pool must hold one sequence this long")
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.5)
    parser.add_argument("--bench-seed", type=int, default=0)


@dataclass(frozen=True)
class Setup:
    """One deployment's cache: device pool blocks, host tier GiB, the kv policy's host credit,
    its cost of loading a LoRA adapter, the unit of its costs and whether it seeds idle replicas."""

    kv_blocks: int
    kv_offload_gib: float
    host_block_credit: float
    lora_load_cost_tokens: int = RouterOptions().lora_load_cost_tokens
    cost_unit: str = RouterOptions().cost_unit
    seed_idle_replicas: bool = RouterOptions().seed_idle_replicas

    @property
    def name(self) -> str:
        tier = f" + host {self.kv_offload_gib:g} GiB, credit {self.host_block_credit:g}" if self.kv_offload_gib else ""
        lora = (f", LoRA load cost {self.lora_load_cost_tokens}"
                if self.lora_load_cost_tokens != RouterOptions().lora_load_cost_tokens else "")
        unit = f", cost in {self.cost_unit}" if self.cost_unit != RouterOptions().cost_unit else ""
        seeding = (f", seed idle replicas {'on' if self.seed_idle_replicas else 'off'}"
                   if self.seed_idle_replicas != RouterOptions().seed_idle_replicas else "")
        return f"{self.kv_blocks} blocks{tier}{lora}{unit}{seeding}"


def setups(args: argparse.Namespace, policy: str) -> list[Setup]:
    """The reference pool if asked, then every host tier size over `kv_blocks`, and for the kv
    policy with a host tier, every credit (the credit changes nothing elsewhere); for the kv
    policy under the lora workload, every LoRA load cost; for the kv policy, every cost unit
    and each way of seeding idle replicas."""
    default_credit = RouterOptions().host_block_credit
    runs = [Setup(args.unbounded_kv_blocks, 0.0, default_credit)] if args.unbounded_kv_blocks else []
    for gib in args.kv_offload_gib:
        credits = args.host_block_credit if gib and policy == "kv" else [default_credit]
        runs += [Setup(args.kv_blocks, gib, credit) for credit in credits]
    if policy == "kv" and LORA_WORKLOAD in args.workloads:
        runs = [replace(run, lora_load_cost_tokens=cost) for run in runs for cost in args.lora_load_cost_tokens]
    if policy == "kv":
        runs = [replace(run, cost_unit=unit) for run in runs for unit in args.cost_unit]
        runs = [replace(run, seed_idle_replicas=seeding == "on") for run in runs for seeding in args.seed_idle_replicas]
    return runs


def replica_engine(kv_blocks: int, max_model_len: int, block_size: int, kv_offload_gib: float = 0.0) -> dict:
    """The engine settings of one replica, but the model and LoRA: float32 on the CPU, one
    torch thread (`kvserve bench engine --step-points` measures the same engine)."""
    return {"device": "cpu", "dtype": "float32", "cpu_threads": 1, "num_kv_blocks": kv_blocks,
            "kv_offload_gib": kv_offload_gib, "max_model_len": max_model_len, "block_size": block_size}


def _config(args: argparse.Namespace, model: str, adapters: dict[str, str], policy: str, setup: Setup, port: int):
    from kvserve.cluster.config import load_config

    lora = {"enable_lora": True, "max_loras": args.max_loras, "lora_modules": adapters} if adapters else {}
    engine = replica_engine(setup.kv_blocks, args.max_model_len, args.block_size, setup.kv_offload_gib)
    return load_config(None, {
        "engine": {"model": model, **engine, **lora},
        "serving": {"app_name": "bench", "replicas": args.replicas, "ingress_replicas": args.ingress,
                    "router": policy, "port": port,
                    "replica_cpus": 1, "max_ongoing_requests": 256,
                    "router_options": {"host_block_credit": setup.host_block_credit,
                                       "lora_load_cost_tokens": setup.lora_load_cost_tokens,
                                       "cost_unit": setup.cost_unit,
                                       "seed_idle_replicas": setup.seed_idle_replicas}},
    })


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

    adapters = (bench_lora_adapters(model, Path(model).parent, args.loras)
                if LORA_WORKLOAD in args.workloads else {})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2 * args.replicas + 2, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    jsonl = Path(f"{args.out}.jsonl")
    jsonl.unlink(missing_ok=True)
    summaries = []
    try:
        for policy in args.policies:
            for setup in setups(args, policy):
                serve.run(build_app(_config(args, model, adapters, policy, setup, port)), name="bench", route_prefix="/")
                _wait_ready(url, args.replicas)
                _warm_up(url, args.replicas, args.block_size)
                for workload in args.workloads:
                    summary = _run_setup(args, url, policy, setup, workload, list(adapters))
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


def _warm_up(url: str, replicas: int, block_size: int) -> None:
    """A few concurrent throwaway requests, so that no measured request pays a replica's first
    forward passes. Each is shorter than a KV block, prompt and answer together, so that no
    replica caches anything after them: the first measured requests find the replicas as a
    fresh deployment has them (a `kv` router sends a prompt no one holds to an empty replica).
    Their token ids are outside every workload's prompts (those start at 10)."""
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    answer_tokens = 4
    prompt_tokens = max(block_size - answer_tokens - 1, 1)

    def body(i: int) -> dict:
        prompt = ([3 + i % 7, 3 + (i // 7) % 7] * block_size)[:prompt_tokens]  # distinct, so no policy piles them up
        return {"model": model, "prompt": prompt, "max_tokens": answer_tokens, "ignore_eos": True}

    async def send_all() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body(i)) for i in range(4 * replicas)))

    asyncio.run(send_all())


def _run_setup(args: argparse.Namespace, url: str, policy: str, setup: Setup, workload: str,
               adapters: list[str]) -> dict:
    label = f"{policy}/{workload}" if len(setups(args, policy)) == 1 else f"{policy} {setup.name}/{workload}"
    run = argparse.Namespace(**{**vars(args), "url": url, "workload": workload, "label": label})
    summary = _run_workload(run, adapters)
    summary.update(policy=policy, setup=asdict(setup))
    return summary


def _run_workload(args: argparse.Namespace, adapters: list[str]) -> dict:
    base = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]
    if args.workload == LORA_WORKLOAD:
        prompts, models = lora_requests(args, base["vocab_size"], adapters)
    else:
        prompts = bench_serve.make_prompts(args, base["vocab_size"])
        models = [base["id"]] * len(prompts)
        if args.trace_out:
            write_trace(args, prompts)  # the same for every policy: the last one written stays
    decisions = routing_decisions if args.ingress == 1 else lambda url: Counter()  # see the module's text
    decided_before, host_hits_before = decisions(args.url), host_tier_hits(args.url)
    results, elapsed = asyncio.run(bench_serve.run_load(args, prompts, models))
    summary = bench_serve.summarize(args, results, elapsed, bench_serve.oracle_hit_rate(prompts, args.block_size))
    summary["decisions"] = dict(decisions(args.url) - decided_before)
    summary["ingress"] = args.ingress
    summary["host_tier_hit_blocks"] = host_tier_hits(args.url) - host_hits_before
    summary["requests_per_replica"] = sorted(Counter(r.replica for r in results if r.ok).values(), reverse=True)
    return summary


def write_trace(args: argparse.Namespace, prompts: list[list[int]]) -> Path:
    """The workload's requests as a Mooncake trace: planned send times, prompt and output
    lengths, a hash id per `block_size` tokens."""
    arrivals = bench_serve.send_times(args.rate, len(prompts), args.bench_seed)
    path = Path(f"{args.trace_out}-{args.workload}.jsonl")
    write_mooncake(path, mooncake_from_prompts(prompts, arrivals, args.output_len, args.block_size))
    return path


def lora_requests(args: argparse.Namespace, vocab: int, adapters: list[str]) -> tuple[list[list[int]], list[str]]:
    """Prompts in send order and the adapter of each: an adapter drawn at random, its own
    system prompt of `prefix_len` tokens, then `prompt_len` new ones."""
    rng = random.Random(f"{LORA_WORKLOAD}-{args.bench_seed}")
    systems = {name: [rng.randrange(10, vocab) for _ in range(args.prefix_len)] for name in adapters}
    chosen = [rng.choice(adapters) for _ in range(args.num_requests)]
    prompts = [systems[name] + [rng.randrange(10, vocab) for _ in range(args.prompt_len)] for name in chosen]
    return prompts, chosen


def _samples(url: str, family_name: str) -> list:
    """The samples of one metric family on the ingress's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return [sample for family in text_string_to_metric_families(text) if family.name == family_name
            for sample in family.samples]


def routing_decisions(url: str) -> Counter:
    """The ingress's routing decisions so far, by reason."""
    return Counter({sample.labels["reason"]: int(sample.value)
                    for sample in _samples(url, "kvserve_routing_decisions") if sample.name.endswith("_total")})


def host_tier_hits(url: str) -> int:
    """Prompt blocks found in the replicas' host-memory tiers so far, all replicas together, as
    their last heartbeats say (0 without a tier)."""
    return int(sum(sample.value for sample in _samples(url, "kvserve_host_kv_hit_blocks_total")))


def print_comparison(summaries: list[dict]) -> None:
    print("\n| workload | policy | cache | hit rate (oracle) | host-tier hit blocks | TTFT p50 ms | TTFT p99 ms "
          "| TPOT p50 ms | E2E p50 ms | req/s | goodput req/s | refused | decisions | requests per replica |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    # sorted is stable: a policy's setups stay in the order they ran
    for s in sorted(summaries, key=lambda s: (s["workload"], POLICIES.index(s["policy"]))):
        print(f"| {s['workload']} | {s['policy']} | {Setup(**s['setup']).name} "
              f"| {s['prefix_hit_rate']:.3f} ({s['oracle_hit_rate']:.3f}) | {s['host_tier_hit_blocks']} "
              f"| {s['ttft']['p50'] * 1e3:.0f} | {s['ttft']['p99'] * 1e3:.0f} | {s['tpot']['p50'] * 1e3:.1f} "
              f"| {s['e2e']['p50'] * 1e3:.0f} | {s['request_throughput']:.2f} | {s['goodput']:.2f} | {s['refused']} "
              f"| {', '.join(f'{reason} {n}' for reason, n in sorted(s['decisions'].items()))} "
              f"| {' '.join(map(str, s['requests_per_replica']))} |")
