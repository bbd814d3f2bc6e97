"""The `kvserve` command line."""

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_MODEL_DIR = Path(os.environ.get("KVSERVE_HOME", Path.home() / ".cache" / "kvserve")) / "tiny-llama"


def default_model() -> str:
    """The built-in default: a tiny random-weight Llama, built here on first use."""
    from kvserve.cluster.tiny_model import build_tiny_checkpoint

    return str(build_tiny_checkpoint(DEFAULT_MODEL_DIR, arch="llama"))


BENCH_MODEL_SHAPE = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
)


ROUTER_BENCH_SHAPE = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
)


def router_bench_model() -> str:
    """A small random-weight Llama whose prefill costs enough on a CPU core for the router to
    matter, with room for long conversations."""
    from kvserve.cluster.tiny_model import build_tiny_checkpoint

    return str(build_tiny_checkpoint(DEFAULT_MODEL_DIR.parent / "router-bench-llama", arch="llama",
                                     **ROUTER_BENCH_SHAPE))


def bench_model() -> str:
    """A small random-weight Llama for engine benchmarks: big enough that the model's work,
    not Python, fills most of a step on a CPU."""
    from kvserve.cluster.tiny_model import build_tiny_checkpoint

    return str(build_tiny_checkpoint(DEFAULT_MODEL_DIR.parent / "bench-llama", arch="llama", **BENCH_MODEL_SHAPE))


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face checkpoint folder (default: a tiny built-in model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--no-prefix-caching", action="store_true")


def _engine_options(args: argparse.Namespace) -> dict:
    options = {
        "device": args.device,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "enable_prefix_caching": not args.no_prefix_caching,
    }
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    return options


def _generate(args: argparse.Namespace) -> int:
    from kvserve.workers.llm import LLM
    from kvserve.workers.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    llm = LLM(args.model or default_model(), **_engine_options(args), tp_size=args.tp)
    try:
        outputs = llm.generate(args.prompt or ["Hello, my name is"], params)
    finally:
        llm.engine.shutdown()
    for output in outputs:
        completion = output.outputs[0]
        if args.json:
            record = {
                "prompt": output.prompt,
                "text": completion.text,
                "token_ids": completion.token_ids,
                "finish_reason": completion.finish_reason,
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"{output.prompt!r} -> {completion.text!r} ({completion.finish_reason})")
    return 0


def _config_overrides(args: argparse.Namespace) -> dict:
    engine = {"model": args.model, "device": args.device, "dtype": args.dtype, "tp_size": args.tp}
    serving = {"replicas": args.replicas, "router": args.router, "host": args.host, "port": args.port}
    return {"engine": engine, "serving": serving}


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    import ray
    from ray import serve

    from kvserve.cluster.app import build_app
    from kvserve.cluster.config import load_config

    config = load_config(args.config, _config_overrides(args), default_model)
    ray.init(address=args.address, ignore_reinit_error=True, logging_level="WARNING")
    serving = config.serving
    serve.start(http_options={"host": serving.host, "port": serving.port})
    serve.run(build_app(config), name=serving.app_name, route_prefix="/")
    print(f"kvserve: serving {config.served_model_name()!r} at http://{serving.host}:{serving.port}/v1 "
          f"({serving.replicas} replica(s), router {serving.router}); Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("kvserve: shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kvserve.cluster.config import load_config

    config = load_config(args.config, default_model=lambda: str(DEFAULT_MODEL_DIR))
    print(f"{args.config}: valid ({config.serving.replicas} replica(s), router {config.serving.router})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kvserve.cluster.bench import engine as bench_engine

    return bench_engine.main(args, args.model or bench_model(), _engine_options(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="LLM serving on Ray with a KV-aware router")
    verbs = parser.add_subparsers(dest="verb", required=True)

    gen = verbs.add_parser("generate", help="offline generation, no HTTP")
    _add_engine_flags(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (worker actors on a local Ray)")
    gen.set_defaults(run=_generate)

    srv = verbs.add_parser("serve", help="start (or join) Ray, deploy, serve HTTP until Ctrl-C")
    srv.add_argument("--config", help="application config YAML (see configs/)")
    srv.add_argument("--model", help="Hugging Face checkpoint folder (default: a tiny built-in model)")
    srv.add_argument("--replicas", type=int)
    srv.add_argument("--router", choices=["kv", "pow2", "round_robin", "prefix_approx"])
    srv.add_argument("--device", choices=["auto", "cpu", "cuda"])
    srv.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    srv.add_argument("--tp", type=int, help="tensor-parallel ranks per replica (engine.tp_size)")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--address", help="Ray cluster address to join (default: start a local Ray)")
    srv.set_defaults(run=_serve)

    val = verbs.add_parser("validate", help="check an application config file")
    val.add_argument("config")
    val.set_defaults(run=_validate)

    bench = verbs.add_parser("bench", help="benchmarks")
    bench_verbs = bench.add_subparsers(dest="bench_verb", required=True)
    engine = bench_verbs.add_parser("engine", help="offline engine against HF transformers generate")
    _add_engine_flags(engine)
    from kvserve.cluster.bench.engine import add_flags

    add_flags(engine)
    engine.set_defaults(run=_bench)
    from kvserve.cluster.bench import serve as bench_serve

    load = bench_verbs.add_parser("serve", help="load generator against a running endpoint")
    bench_serve.add_flags(load)
    load.set_defaults(run=lambda args: bench_serve.main(args))
    from kvserve.cluster.bench import route as bench_route

    route = bench_verbs.add_parser("route", help="time of the KV-aware routing decision")
    bench_route.add_flags(route)
    route.set_defaults(run=lambda args: bench_route.main(args))
    from kvserve.cluster.bench import tp as bench_tp

    tp = bench_verbs.add_parser("tp", help="per-step overhead of tensor parallelism against tp 1")
    _add_engine_flags(tp)
    bench_tp.add_flags(tp)
    tp.set_defaults(run=lambda args: bench_tp.main(args, args.model or bench_model(), _engine_options(args)))
    from kvserve.cluster.bench import routers as bench_routers

    routers = bench_verbs.add_parser("routers", help="every routing policy side by side on local CPU replicas")
    routers.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    bench_routers.add_flags(routers)
    routers.set_defaults(run=lambda args: bench_routers.main(args, args.model or router_bench_model()))
    from kvserve.cluster.bench import decode as bench_decode, kernels as bench_kernels

    kernels = bench_verbs.add_parser("kernels", help="paged attention against copy bandwidth and torch SDPA")
    bench_kernels.add_flags(kernels)
    kernels.set_defaults(run=bench_kernels.main)
    decode = bench_verbs.add_parser("decode", help="decode step of a Llama-3-8B-shaped model against its floor and HF")
    bench_decode.add_flags(decode)
    decode.set_defaults(run=bench_decode.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvserve {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
