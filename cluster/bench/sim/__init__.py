"""`kvserve bench sim`: the cluster simulator, our real router and engine bookkeeping in
simulated time (docs/sim.md).

Modules, one job each: `step_time` (how long a step takes: roofline presets or a fit),
`workloads` (traces and generators), `prompts` (their tokens and block hashes), `replica`
(Scheduler + KVCacheManager + step time), `relay` (KV events and load, delayed, into each
router's follower), `routers` (ours) and `baselines` (the others and the oracle),
`simulator` (the event loop) and `report` (tables, plots, JSON).
"""

import argparse
import sys
import time

from kvserve.cluster.bench.sim.prompts import BlockChains
from kvserve.cluster.bench.sim.routers import SIM_POLICIES
from kvserve.cluster.bench.sim.simulator import SimConfig, simulate
from kvserve.cluster.bench.sim.step_time import PRESETS, step_time_model
from kvserve.cluster.bench.sim.workloads import GENERATORS, generated_workload, trace_workload
from kvserve.router.options import RouterOptions

_ENGINE_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 2048}  # EngineConfig's
_SERVE_DEFAULTS = {"max_queued_requests": 512}  # ServingConfig's


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _words(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def _param(text: str) -> tuple[str, float | int | str]:
    key, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for number in (int, float):
        try:
            return key.replace("-", "_"), number(value)
        except ValueError:
            pass
    return key.replace("-", "_"), value


def add_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--trace", help="Mooncake-format JSONL trace (timestamp ms, input_length, output_length, hash_ids)")
    source.add_argument("--workload", choices=sorted(GENERATORS), help="a generated workload (default: llmd)")
    parser.add_argument("--trace-block-tokens", type=int, default=512, help="tokens per trace hash id (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=2000, help="requests of a generated workload (default: %(default)s)")
    parser.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                        help="a generator setting, e.g. customers=150 or output_tokens=200 (repeatable)")
    parser.add_argument("--replicas", type=_ints, default=[8], help="replica counts, comma-separated (default: 8)")
    parser.add_argument("--ingress", type=_ints, default=[1], help="ingress router counts, e.g. 1,4,16 (default: 1)")
    parser.add_argument("--preset", default="h100-qwen3-32b-tp2", help="step-time roofline preset (default: "
                        f"%(default)s); one of: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--step-fit", help="JSON of measured steps to fit the step time to (instead of --preset)")
    parser.add_argument("--kv-blocks", type=int, help="KV pool blocks per replica (default: what the preset's GPU leaves)")
    parser.add_argument("--rates", type=_words, default=None,
                        help="request rates (req/s), comma-separated; 'native' for a trace's own (default: 2,4,8; "
                        "a trace: native)")
    parser.add_argument("--policies", type=_words, default=list(SIM_POLICIES),
                        help=f"comma-separated, of {','.join(SIM_POLICIES)} (default: all)")
    parser.add_argument("--event-delay-s", type=float, default=0.05,
                        help="delay of KV events and load reports from replica to router (default: %(default)s)")
    parser.add_argument("--route-call-ms", type=float, default=0.5,
                        help="one remote call a policy waits on to route a request: Ray's tree router asks its tree "
                        "actor once, twice where the match is short (default: %(default)s; docs/sim.md)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=32768, help="(default: %(default)s)")
    for name, default in {**_ENGINE_DEFAULTS, **_SERVE_DEFAULTS}.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help="(default: %(default)s)")
    parser.add_argument("--max-ongoing-requests", type=int, help="(default: --max-num-seqs, as ServingConfig's)")
    parser.add_argument("--max-queue-wait-s", type=float, help="a replica refuses a new request that would wait "
                        "longer for its first step (EngineConfig's max_queue_wait_s; default: never)")
    parser.add_argument("--kv-option", type=_param, action="append", default=[], metavar="KEY=VALUE",
                        help="a RouterOptions field of the kv policy, e.g. max_imbalance=16 (repeatable)")
    parser.add_argument("--warmup-s", type=float, default=0.0,
                        help="leave out of every figure the requests that arrive in the run's first this many "
                        "seconds: the cluster's cold start, its caches empty (default: %(default)s)")
    parser.add_argument("--slo-ttft-s", type=float, default=2.0, help="goodput's TTFT bound (default: %(default)s)")
    parser.add_argument("--slo-tpot-s", type=float, help="goodput's TPOT bound (default: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--markdown", help="write the tables here (default: print them)")
    parser.add_argument("--plot", help="PNG path prefix (default: the --json path without .json)")


def _workload(args: argparse.Namespace):
    if args.trace:
        return trace_workload(args.trace, args.trace_block_tokens)
    return generated_workload(args.workload or "llmd", args.requests, args.seed, **dict(args.param))


def _rates(args: argparse.Namespace, workload) -> list[float]:
    words = args.rates or (["native"] if workload.native_rate else ["2", "4", "8"])
    rates = [workload.native_rate if w == "native" else float(w) for w in words]
    if any(r is None or r <= 0 for r in rates):
        raise ValueError("rates must be positive ('native' only with --trace)")
    return rates


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Every policy x rate x replicas x ingress on one workload; a record each."""
    from kvserve.cluster.bench.sim.baselines import oracle_hit_rate
    from kvserve.cluster.bench.sim.report import summarize

    if args.warmup_s < 0:
        raise ValueError("--warmup-s must be 0 or more")
    unknown = [p for p in args.policies if p not in SIM_POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; choose from {', '.join(SIM_POLICIES)}")
    step_time = step_time_model(args.preset, args.step_fit)
    workload = _workload(args)
    chains = BlockChains(args.block_size)
    records = []
    for rate in _rates(args, workload):
        items = workload.at_rate(rate)
        measured_from = items[0].arrival_s + args.warmup_s if items else 0.0
        oracle = oracle_hit_rate(items, chains, args.block_size, measured_from)
        for replicas in args.replicas:
            for ingress in args.ingress:
                config = _config(args, replicas, ingress)
                for policy in args.policies:
                    start = time.perf_counter()
                    jobs = simulate(policy, items, step_time, config, chains)
                    record = {"policy": policy, "workload": workload.name, "workload_params": workload.params,
                              "rate": round(rate, 6),
                              "replicas": replicas, "ingress": ingress, "oracle_hit_rate": oracle,
                              **summarize([j for j in jobs if j.arrival_s >= measured_from], args.slo_ttft_s,
                                          args.slo_tpot_s),
                              **_settings(args, config, step_time), "wall_s": time.perf_counter() - start}
                    records.append(record)
                    print(_progress(record), file=sys.stderr, flush=True)
    return records


def _config(args: argparse.Namespace, replicas: int, ingress: int) -> SimConfig:
    return SimConfig(replicas=replicas, ingress=ingress, block_size=args.block_size, kv_blocks=args.kv_blocks,
                     max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                     max_model_len=args.max_model_len, max_ongoing_requests=args.max_ongoing_requests,
                     max_queued_requests=args.max_queued_requests, max_queue_wait_s=args.max_queue_wait_s,
                     event_delay_s=args.event_delay_s, route_call_s=args.route_call_ms / 1e3, seed=args.seed,
                     router_options=RouterOptions(**dict(args.kv_option)))


def _settings(args: argparse.Namespace, config: SimConfig, step_time) -> dict:
    return {"step_time": args.step_fit or args.preset, "kv_blocks": config.kv_blocks or step_time.kv_blocks(config.block_size),
            "block_size": config.block_size, "event_delay_s": config.event_delay_s,
            "route_call_s": config.route_call_s, "seed": config.seed,
            "max_ongoing_requests": config.max_ongoing_requests, "max_queue_wait_s": config.max_queue_wait_s,
            "slo_ttft_s": args.slo_ttft_s, "slo_tpot_s": args.slo_tpot_s, "warmup_s": args.warmup_s,
            "kv_options": config.router_options.model_dump()}


def _progress(record: dict) -> str:
    p90 = record["ttft_p90_s"]
    return (f"sim: {record['workload']} rate {record['rate']:g} replicas {record['replicas']} ingress "
            f"{record['ingress']} {record['policy']:>13}: hit {record['hit_rate']:.1%} (oracle "
            f"{record['oracle_hit_rate']:.1%}), TTFT p90 {'-' if p90 is None else f'{p90:.3f} s'}, "
            f"refused {record['refused']}, decision p99 {_ms(record['decision_p99_ms'])} [{record['wall_s']:.1f} s]")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def main(args: argparse.Namespace) -> int:
    from kvserve.cluster.bench.sim import report

    records = run_sweep(args)
    tables = report.markdown(records)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(tables)
    else:
        print(tables)
    if args.json:
        report.write_json(records, args.json)
    prefix = args.plot or (args.json[: -len(".json")] if args.json and args.json.endswith(".json") else args.json)
    if prefix:
        for path in report.plot(records, prefix):
            print(f"sim: wrote {path}", file=sys.stderr)
    return 0
