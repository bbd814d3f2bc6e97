"""How long Ray Serve LLM's prefix-tree router waits on its tree actor per request.

Ray's `PrefixCacheAffinityRouter` decides with `ray.get(tree_actor.prefix_match.remote(...))`
(and `get_smallest_tenants` where the match is short), then inserts the prompt with another
`ray.get`. This times those calls on Ray's own `PrefixTreeActor`, filled with chat-shaped
prompts (a few shared system prompts, each followed by a history), the figure behind
`kvserve bench sim --route-call-ms` (docs/sim.md).

    python scripts/ray-tree-call-latency.py [--replicas 8] [--calls 500]
"""

import argparse
import random
import statistics
import time

import ray
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTreeActor


def chat_prompts(rng: random.Random, system_prompts: int):
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]

    def text(count: int) -> str:
        return " ".join(rng.choice(words) for _ in range(count))

    systems = [text(700) for _ in range(system_prompts)]  # about 1,000 tokens each
    while True:
        yield rng.choice(systems) + text(rng.randint(800, 3500))


def timed_ms(call) -> float:
    start = time.perf_counter()
    ray.get(call())
    return (time.perf_counter() - start) * 1e3


def summary(name: str, times: list[float]) -> str:
    ordered = sorted(times)
    return (f"{name:22s} p50 {ordered[len(ordered) // 2]:.3f} ms  p90 {ordered[int(0.9 * len(ordered))]:.3f} ms  "
            f"mean {statistics.mean(times):.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=8, help="tenants in the tree (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=500, help="timed calls of each kind (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    tree = PrefixTreeActor.remote()
    tenants = [f"SERVE_REPLICA::default#llm#{k:08x}" for k in range(args.replicas)]
    ray.get(tree.add_tenants.remote(tenants, time.time()))
    rng = random.Random(args.seed)
    prompts = chat_prompts(rng, system_prompts=args.replicas)
    for _ in range(300):  # the tree as after a few minutes of traffic
        ray.get(tree.insert.remote(next(prompts), rng.choice(tenants), time.time()))
    match, smallest, insert = [], [], []
    for _ in range(args.calls):
        prompt = next(prompts)
        match.append(timed_ms(lambda: tree.prefix_match.remote(prompt, tenants)))
        smallest.append(timed_ms(lambda: tree.get_smallest_tenants.remote()))
        insert.append(timed_ms(lambda: tree.insert.remote(prompt, rng.choice(tenants), time.time())))
    print(f"{ray.__version__=}, {args.replicas} tenants, prompts of about "
          f"{statistics.mean(len(next(prompts)) for _ in range(100)):.0f} characters")
    for name, times in (("prefix_match", match), ("get_smallest_tenants", smallest), ("insert", insert)):
        print(summary(name, times))


if __name__ == "__main__":
    main()
