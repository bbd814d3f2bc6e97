"""`kvserve bench serve`: an open-loop load generator against a running endpoint.

Requests go out at a Poisson rate; each streams, so time to first token (TTFT), time per
output token (TPOT), inter-token latency (ITL) and end-to-end latency (E2E) are measured as a
client sees them. The prefix hit rate comes from the server's own `cached_tokens`, and an
oracle rate — what one replica with an unbounded cache would reuse — is computed from the
prompts themselves for comparison.
"""

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from kvserve.workers.engine.block_hash import hash_block_chain


@dataclass
class Result:
    ok: bool
    status: int = 200
    refusal: str = ""  # the server's reason, when it refused the request
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    replica: str = ""  # the replica that served it (the `x-kvserve-replica` header)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--workload", choices=["random", "shared-prefix", "multi-turn"], default="shared-prefix")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128, help="unique prompt tokens per request")
    parser.add_argument("--prefix-len", type=int, default=384, help="shared-prefix: tokens of each group's prefix")
    parser.add_argument("--groups", type=int, default=8, help="shared-prefix groups / multi-turn conversations")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-history", type=int, default=1536, help="multi-turn: longest conversation, in tokens")
    parser.add_argument("--system-len", type=int, default=0,
                        help="shared-prefix, multi-turn: tokens of a system prompt that opens every prompt")
    parser.add_argument("--block-size", type=int, default=16, help="for the oracle hit rate")
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="goodput: TTFT limit in seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.5, help="goodput: TPOT limit in seconds")
    parser.add_argument("--label", default="", help="name of this run in the table and plot")
    parser.add_argument("--json-out", help="append the summary as one JSON line to this file")
    parser.add_argument("--plot", help="write a PNG of latency percentiles here (with --json-out, of every run in it)")
    parser.add_argument("--bench-seed", type=int, default=0)


def _words(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def make_prompts(args, vocab: int) -> list[list[int]]:
    """Token-id prompts in send order. multi-turn: each conversation's next prompt holds its
    whole history (earlier prompts plus a stand-in for the answers) and a new user turn.
    With `system_len`, the shared-prefix and multi-turn prompts open with one system prompt,
    as a chat application's do; the tokens after it are the same as without."""
    rng = random.Random(f"{args.workload}-{args.bench_seed}")  # workloads share no tokens by chance
    if args.workload == "random":
        return [_words(rng, args.prompt_len, vocab) for _ in range(args.num_requests)]
    system = _words(random.Random(f"system-{args.bench_seed}"), args.system_len, vocab)
    if args.workload == "shared-prefix":
        prefixes = [system + _words(rng, args.prefix_len, vocab) for _ in range(args.groups)]
        return [rng.choice(prefixes) + _words(rng, args.prompt_len, vocab) for _ in range(args.num_requests)]
    histories = [system + _words(rng, args.prefix_len, vocab) for _ in range(args.groups)]
    prompts = []
    for _ in range(args.num_requests):
        c = rng.randrange(args.groups)
        if len(histories[c]) + args.prompt_len + args.output_len > args.max_history:
            histories[c] = system + _words(rng, args.prefix_len, vocab)  # a new conversation
        histories[c] = histories[c] + _words(rng, args.prompt_len, vocab)
        prompts.append(list(histories[c]))
        histories[c] = histories[c] + _words(rng, args.output_len, vocab)
    return prompts


def oracle_hit_rate(prompts: list[list[int]], block_size: int) -> float:
    """What one replica with an unbounded cache would reuse: every full block of every earlier
    prompt stays cached; a lookup leaves at least the last token to compute, as the engine's."""
    seen: set[bytes] = set()
    hit = total = 0
    for prompt in prompts:
        chain = hash_block_chain(prompt, block_size)
        lookup = chain[: (len(prompt) - 1) // block_size]
        hit += next((i for i, h in enumerate(lookup) if h not in seen), len(lookup)) * block_size
        total += len(prompt)
        seen.update(chain)
    return hit / total


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = Result(ok=False)
    last = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        result.status = reply.status_code
        result.replica = reply.headers.get("x-kvserve-replica", "")
        if reply.status_code != 200:
            await reply.aread()
            result.refusal = _reason(reply)
            return result
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
                result.prompt_tokens = usage["prompt_tokens"]
                result.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                result.output_tokens = usage["completion_tokens"]
            if chunk.get("choices"):
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    result.e2e = time.perf_counter() - start
    result.ok = True
    return result


def _reason(reply: httpx.Response) -> str:
    try:
        return f"{reply.status_code}: {reply.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{reply.status_code}: {reply.text[:200]}"


def fit_lengths(args, max_model_len: int) -> str | None:
    """Shrinks the token lengths in proportion so that the longest request (prompt plus
    output) fits the served model; returns a note saying so, or None when they already fit."""
    names = ["system_len", "prompt_len", "output_len"] + ([] if args.workload == "random" else ["prefix_len"])
    longest = sum(getattr(args, name) for name in names)
    if args.workload == "multi-turn":
        args.max_history = min(args.max_history, max_model_len)
    if longest <= max_model_len:
        return None
    scale = max_model_len / longest
    for name in names:
        value = getattr(args, name)
        setattr(args, name, max(1, int(value * scale)) if value else 0)
    shown = ", ".join(f"{name.replace('_', '-')} {getattr(args, name)}" for name in names)
    return f"lengths shrunk to fit the model's max_model_len {max_model_len}: {shown}"


def send_times(rate: float, count: int, seed: int) -> list[float]:
    """When each request goes out, in seconds from the first: Poisson arrivals at `rate`."""
    rng = random.Random(seed + 1)
    times = [0.0]
    while len(times) < count:
        times.append(times[-1] + rng.expovariate(rate))
    return times[:count]


async def run_load(args, prompts: list[list[int]], models: list[str]) -> tuple[list[Result], float]:
    """Sends each prompt to its model (a base model or a LoRA adapter) at its planned time
    (`send_times`), so that a trace of the plan is what was sent."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for prompt, model, at in zip(prompts, models, send_times(args.rate, len(prompts), args.bench_seed)):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(client, args.url, model, prompt, args.output_len)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(args, results: list[Result], elapsed: float, oracle: float) -> dict:
    done = [r for r in results if r.ok]
    good = [r for r in done if r.ttft <= args.slo_ttft and (r.tpot or 0) <= args.slo_tpot]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    return {
        "label": args.label or args.workload,
        "workload": args.workload,
        "rate": args.rate,
        "requests": len(results),
        "refused": len(results) - len(done),
        "refusals": dict(Counter(r.refusal for r in results if not r.ok).most_common()),
        "ttft": percentiles([r.ttft for r in done]),
        "tpot": percentiles([r.tpot for r in done if r.tpot is not None]),
        "itl": percentiles([x for r in done for x in r.itls]),
        "e2e": percentiles([r.e2e for r in done]),
        "request_throughput": len(done) / elapsed,
        "output_token_throughput": sum(r.output_tokens for r in done) / elapsed,
        "goodput": len(good) / elapsed,
        "prefix_hit_rate": sum(r.cached_tokens for r in done) / max(prompt_tokens, 1),
        "oracle_hit_rate": oracle,
    }


def print_table(summary: dict) -> None:
    print(f"== {summary['label']} ({summary['workload']}, {summary['rate']} req/s, {summary['requests']} requests, "
          f"{summary['refused']} refused)")
    for reason, count in summary.get("refusals", {}).items():
        print(f"refused x{count}: {reason}")
    print(f"{'metric':<8}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        p = summary[name]
        print(f"{name.upper():<8}{p['p50'] * 1e3:>10.1f}{p['p90'] * 1e3:>10.1f}{p['p99'] * 1e3:>10.1f}")
    print(f"throughput: {summary['request_throughput']:.2f} req/s, {summary['output_token_throughput']:.1f} "
          f"output tok/s, goodput {summary['goodput']:.2f} req/s")
    print(f"prefix hit rate: {summary['prefix_hit_rate']:.3f} (oracle {summary['oracle_hit_rate']:.3f})")


def plot(summaries: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = [s["label"] for s in summaries]
    for ax, metric in zip(axes, ("ttft", "tpot", "e2e")):
        for k, q in enumerate(("p50", "p90", "p99")):
            xs = [i + (k - 1) * 0.27 for i in range(len(summaries))]
            ax.bar(xs, [s[metric][q] * 1e3 for s in summaries], width=0.27, label=q)
        ax.set_xticks(range(len(summaries)), labels, rotation=30, ha="right")
        ax.set_title(f"{metric.upper()} (ms)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> int:
    models = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"]
    model = models[0]["id"]
    vocab = models[0].get("vocab_size") or 32000
    if models[0].get("max_model_len") and (note := fit_lengths(args, models[0]["max_model_len"])):
        print(note)
    prompts = make_prompts(args, vocab)
    results, elapsed = asyncio.run(run_load(args, prompts, [model] * len(prompts)))
    summary = summarize(args, results, elapsed, oracle_hit_rate(prompts, args.block_size))
    print_table(summary)
    summaries = [summary]
    if args.json_out:
        with open(args.json_out, "a") as out:
            out.write(json.dumps(summary) + "\n")
        with open(args.json_out) as inp:
            summaries = [json.loads(line) for line in inp if line.strip()]
    if args.plot:
        plot(summaries, args.plot)
    return 0
