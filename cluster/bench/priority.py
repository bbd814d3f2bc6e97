"""`kvserve bench priority`: time to first token of important and unimportant requests on a
saturated engine, under `scheduling_policy: fcfs` and `priority`, side by side.

One engine per policy takes `--requests` requests at once, more than its `--max-num-seqs`
running slots: every other one has `priority` 0 (important: served sooner), the rest
`--low-priority` (10 by default), the unimportant ones queued first so that first come, first
served puts them ahead. Each request's time to first token is the wall time from the moment all
were queued to the end of the step that gave its first token. Reported per policy and class:
TTFT p50 and p99, and the last request's end (the total work is the same under both).
"""

import argparse
import time

import torch

from kvserve.cluster.bench.decode import SHAPES, random_model_run
from kvserve.cluster.bench.kernels import add_engine_run_flags, print_table, write_json
from kvserve.cluster.bench.serve import percentiles
from kvserve.workers.engine.sampling_params import SamplingParams

PROMPT_LEN = 32
POLICIES = ("fcfs", "priority")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny", help="model shape, random weights")
    parser.add_argument("--requests", type=int, default=64, help="requests queued at once, half of each class")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="sequences the engine runs at once")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--low-priority", type=int, default=10, help="the unimportant requests' priority")
    add_engine_run_flags(parser)


def main(args: argparse.Namespace) -> int:
    rows = []
    with random_model_run(args) as (model_dir, device, info):
        for policy in POLICIES:
            rows += measure(model_dir, policy, args, device)
    print_table({"policy": "{policy}", "priority": "{priority}", "requests": "{requests}",
                 "TTFT p50 ms": "{ttft_p50_ms:.1f}", "TTFT p99 ms": "{ttft_p99_ms:.1f}",
                 "all done ms": "{makespan_ms:.1f}"}, rows)
    write_json(args.json, dict(info, priority=rows))
    return 0


def measure(model_dir: str, policy: str, args, device: torch.device) -> list[dict]:
    from kvserve.workers.llm import LLM

    max_len = PROMPT_LEN + args.tokens + 16
    llm = LLM(model_dir, device=device.type, dtype=args.dtype, load_format="dummy", max_model_len=max_len,
              max_num_seqs=args.max_num_seqs, scheduling_policy=policy, enable_prefix_caching=False,
              num_kv_blocks=args.max_num_seqs * (-(-max_len // 16) + 1))
    engine = llm.engine
    llm.generate([[3] * PROMPT_LEN], SamplingParams(max_tokens=2))  # warms up
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    classes = {}
    for i in range(args.requests):  # the unimportant ones first
        priority = args.low_priority if i < args.requests // 2 else 0
        request_id = f"{policy}-{i}"
        classes[request_id] = priority
        engine.add_request(request_id, [3 + (i * 13 + j) % 400 for j in range(PROMPT_LEN)], params, priority)
    start, first_token = time.perf_counter(), {}
    while engine.has_unfinished_requests():
        for token in engine.step_tokens():
            first_token.setdefault(token.request_id, time.perf_counter() - start)
    makespan = time.perf_counter() - start
    engine.shutdown()
    rows = []
    for priority in (0, args.low_priority):
        ttfts = [t for request_id, t in first_token.items() if classes[request_id] == priority]
        spread = percentiles(ttfts)
        rows.append(dict(policy=policy, priority=priority, requests=len(ttfts), ttft_p50_ms=spread["p50"] * 1e3,
                         ttft_p99_ms=spread["p99"] * 1e3, makespan_ms=makespan * 1e3))
    return rows
