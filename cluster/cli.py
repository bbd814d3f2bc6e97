"""The `kvserve` command line.

Every flag that sets a config field is an entry of CONFIG_FLAGS and takes its type, choices,
default and help from that pydantic field. A verb's own modules (torch, Ray, the benchmarks)
are imported only when it runs, so that building the parser stays quick."""

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import types
from importlib.metadata import version
from pathlib import Path
from typing import Literal, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kvserve.cluster.config import AppConfig, ClusterConfig, load_config, load_serving_config

MODEL_CACHE = Path(os.environ.get("KVSERVE_HOME", Path.home() / ".cache" / "kvserve"))
DEFAULT_MODEL_DIR = MODEL_CACHE / "tiny-llama"
LOOPBACK = "127.0.0.1"


def default_model() -> str:
    """The built-in default: a tiny random-weight Llama, built here on first use."""
    from kvserve.cluster.tiny_model import build_tiny_checkpoint

    return str(build_tiny_checkpoint(DEFAULT_MODEL_DIR, arch="llama"))


class ConfigFlag(NamedTuple):
    section: str  # the AppConfig field holding `field`: "engine" or "serving"
    field: str
    option: str


CONFIG_FLAGS = (
    ConfigFlag("engine", "model", "--model"),
    ConfigFlag("engine", "device", "--device"),
    ConfigFlag("engine", "dtype", "--dtype"),
    ConfigFlag("engine", "load_format", "--load-format"),
    ConfigFlag("engine", "max_model_len", "--max-model-len"),
    ConfigFlag("engine", "enable_prefix_caching", "--prefix-caching"),  # and --no-prefix-caching
    ConfigFlag("engine", "tp_size", "--tp"),
    ConfigFlag("engine", "speculative", "--speculative-config"),
    ConfigFlag("engine", "enable_lora", "--enable-lora"),  # and --no-enable-lora
    ConfigFlag("engine", "max_loras", "--max-loras"),
    ConfigFlag("engine", "max_lora_rank", "--max-lora-rank"),
    ConfigFlag("engine", "lora_modules", "--lora-modules"),
    ConfigFlag("engine", "max_queue_wait_s", "--max-queue-wait-s"),
    ConfigFlag("serving", "replicas", "--replicas"),
    ConfigFlag("serving", "router", "--router"),
    ConfigFlag("serving", "host", "--host"),
    ConfigFlag("serving", "port", "--port"),
    ConfigFlag("serving", "api_key", "--api-key"),
)
ENGINE_FLAGS = tuple(flag for flag in CONFIG_FLAGS if flag.section == "engine")
# `bench tp` has a --tp of its own: the worker actors it compares with the in-process engine.
BENCH_ENGINE_FLAGS = tuple(flag for flag in ENGINE_FLAGS if flag.field != "tp_size")


def _config_field(flag: ConfigFlag) -> FieldInfo:
    return AppConfig.model_fields[flag.section].annotation.model_fields[flag.field]


def _value_options(annotation) -> dict:
    """How argparse reads a value of `annotation`: `X | None` as X, a bool as a --name /
    --no-name pair, a Literal as its choices, a dict of strings as NAME=VALUE words."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (arg for arg in get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"type": json.loads, "metavar": "JSON"}
    if get_origin(annotation) is dict:
        return {"action": _NamedValues, "nargs": "+", "metavar": "NAME=VALUE"}
    return {"type": annotation}


class _NamedValues(argparse.Action):
    """NAME=VALUE words into a dict (`--lora-modules a=/x b=/y`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        malformed = [v for v in values if "=" not in v or v.startswith("=")]
        if malformed:
            parser.error(f"{option_string}: {malformed[0]!r} is not NAME=VALUE")
        setattr(namespace, self.dest, dict(v.split("=", 1) for v in values))


def _help(field: FieldInfo, model_default: str) -> str:
    default = model_default if field.is_required() else field.get_default(call_default_factory=True)
    text = field.description if default is None else f"{field.description} (default: {default})"
    return text.replace("%", "%%")  # argparse expands %-formats in help


def add_config_flags(parser: argparse.ArgumentParser, flags: tuple[ConfigFlag, ...], model_default: str) -> None:
    """A flag for each of `flags`; `model_default` says which model runs without --model. Every
    flag defaults to None, so that one not given leaves the config file's value in place."""
    for flag in flags:
        field = _config_field(flag)
        parser.add_argument(flag.option, dest=flag.field, help=_help(field, model_default),
                            **_value_options(field.annotation))


def config_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """The config fields the flags given in `args` set, as `load_config` takes them:
    {"engine": {...}, "serving": {...}}."""
    overrides: dict[str, dict] = {}
    for flag in CONFIG_FLAGS:
        value = getattr(args, flag.field, None)
        if value is not None:
            overrides.setdefault(flag.section, {})[flag.field] = value
    return overrides


def _generate(args: argparse.Namespace) -> int:
    from kvserve.workers.engine.sampling_params import SamplingParams
    from kvserve.workers.llm import LLM

    engine = load_config(None, config_overrides(args), default_model).engine
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    llm = LLM(**engine.model_dump())
    try:
        outputs = llm.generate(args.prompt or ["Hello, my name is"], params, lora=args.lora)
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


def _serve(args: argparse.Namespace) -> int:
    _stop_on_signals()
    config = load_serving_config(args.config, config_overrides(args), default_model)
    try:
        _start_ray(args.address)
        if isinstance(config, ClusterConfig):
            _deploy_cluster(config)
        else:
            _deploy(config, local=args.address is None)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("kvserve: shutting down", flush=True)
    finally:
        _stop_ray()
    return 0


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both stop `serve`, whatever disposition it inherited: a background
    job of a non-interactive shell starts with SIGINT ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _start_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray whose every port is on loopback. Ray
    takes the node's address from the network unless it thinks it can't be part of a cluster (as
    on macOS); this environment variable, read when `ray` is imported, makes it use 127.0.0.1."""
    if address is None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if address is None:
        ray.init(address="local", dashboard_host=LOOPBACK, logging_level="WARNING")
    else:
        ray.init(address=address, logging_level="WARNING")


def _deploy(config: AppConfig, local: bool) -> None:
    import ray
    from ray import serve

    from kvserve.cluster import preflight
    from kvserve.cluster.app import build_app
    from kvserve.cluster.deploy import deploy

    if local and not ray.cluster_resources().get("GPU"):
        config = preflight.fit_to_cpus(config, ray.cluster_resources()["CPU"])
    preflight.check(config, preflight.cluster_node_types())
    serving = config.serving
    serve.start(http_options={"host": serving.host, "port": serving.port})
    deploy(build_app(config), config)
    print(f"kvserve: serving {config.served_model_name()!r} at http://{serving.host}:{serving.port}/v1 "
          f"({serving.replicas} replica(s), router {serving.router}); Ctrl-C to stop", flush=True)


def _deploy_cluster(cluster: ClusterConfig) -> None:
    """Several models, each in its Serve application, behind one ingress; each model's replicas
    reserve what its config says (no fitting to a small machine's cores)."""
    from ray import serve

    from kvserve.cluster import preflight
    from kvserve.cluster.app import build_cluster_apps
    from kvserve.cluster.deploy import deploy_cluster

    node_types = preflight.cluster_node_types()
    for model in cluster.models:
        preflight.check(model, node_types)
    serving = cluster.serving
    serve.start(http_options={"host": serving.host, "port": serving.port})
    deploy_cluster(build_cluster_apps(cluster), cluster)
    models = ", ".join(f"{m.served_model_name()!r} ({m.serving.replicas} replica(s), router {m.serving.router})"
                       for m in cluster.models)
    print(f"kvserve: serving {models} at http://{serving.host}:{serving.port}/v1; Ctrl-C to stop", flush=True)


def _stop_ray() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def _validate(args: argparse.Namespace) -> int:
    from kvserve.cluster.validate import validate_file

    kinds, problems = validate_file(args.config, args.crds, default_model=str(DEFAULT_MODEL_DIR))
    for problem in problems:
        print(f"{args.config}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.config}: valid ({', '.join(kinds)})")
    return 0


class _LazyVerbParser(argparse.ArgumentParser):
    """A verb whose flags, and the modules they come from, are added only when the command line
    names it: `add_flags(parser)` runs then."""

    def __init__(self, *args, add_flags, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_flags = add_flags

    def parse_known_args(self, args=None, namespace=None):
        if self._add_flags is not None:
            add_flags, self._add_flags = self._add_flags, None
            add_flags(self)
        return super().parse_known_args(args, namespace)


def _bench_engine_settings(args: argparse.Namespace) -> tuple[str, dict]:
    """The model (the benchmark Llama unless --model) and the engine options the flags give."""
    from kvserve.cluster.bench.models import bench_model

    options = config_overrides(args).get("engine", {})
    return options.pop("model", None) or bench_model(MODEL_CACHE), options


def _engine_bench_flags(name: str):
    """The flags of a benchmark that runs the engine: the engine's config flags and its own."""
    def add_flags(parser: argparse.ArgumentParser) -> None:
        bench = importlib.import_module(f"kvserve.cluster.bench.{name}")
        add_config_flags(parser, BENCH_ENGINE_FLAGS, "a small random-weight Llama, built on first use")
        bench.add_flags(parser)
        parser.set_defaults(run=lambda args: bench.main(args, *_bench_engine_settings(args)))
    return add_flags


def _routers_bench_flags(parser: argparse.ArgumentParser) -> None:
    from kvserve.cluster.bench import routers
    from kvserve.cluster.bench.models import router_bench_model

    parser.add_argument("--model", help="checkpoint folder (default: a small random-weight Llama, built on first use)")
    routers.add_flags(parser)
    parser.set_defaults(run=lambda args: routers.main(args, args.model or router_bench_model(MODEL_CACHE)))


def _plain_bench_flags(name: str):
    """The flags of a benchmark whose `main(args)` needs nothing else."""
    def add_flags(parser: argparse.ArgumentParser) -> None:
        bench = importlib.import_module(f"kvserve.cluster.bench.{name}")
        bench.add_flags(parser)
        parser.set_defaults(run=bench.main)
    return add_flags


BENCHES = (
    ("engine", "offline engine against HF transformers generate", _engine_bench_flags("engine")),
    ("serve", "load generator against a running endpoint", _plain_bench_flags("serve")),
    ("route", "time of the KV-aware routing decision", _plain_bench_flags("route")),
    ("ingress", "the ingress's work on a prompt (tokens, block hashes) and how long it holds the event loop",
     _plain_bench_flags("ingress")),
    ("tp", "per-step overhead of tensor parallelism against tp 1", _engine_bench_flags("tp")),
    ("routers", "every routing policy side by side on local CPU replicas", _routers_bench_flags),
    ("kernels", "paged attention against copy bandwidth and torch SDPA", _plain_bench_flags("kernels")),
    ("decode", "decode step of a Llama-3-8B-shaped model against its floor and HF",
     _plain_bench_flags("decode")),
    ("overhead", "the engine's host time per decode step, phase by phase", _plain_bench_flags("overhead")),
    ("sim", "cluster simulator: our router and engine bookkeeping in simulated time", _plain_bench_flags("sim")),
    ("structured", "decode tokens/s with and without a JSON schema", _plain_bench_flags("structured")),
    ("priority", "time to first token by request priority, fcfs against priority scheduling",
     _plain_bench_flags("priority")),
    ("spec", "decode tokens/s with and without speculative decoding (n-gram or draft model)", _plain_bench_flags("spec")),
)


def _add_generate(verbs) -> None:
    gen = verbs.add_parser("generate", help="offline generation, no HTTP")
    add_config_flags(gen, ENGINE_FLAGS, "a tiny random-weight Llama, built on first use")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass (default: %(default)s)")
    gen.add_argument("--seed", type=int, help="seed of the sampling (default: none)")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--lora", help="the LoRA adapter (a name of --lora-modules) of every prompt (default: none)")
    gen.set_defaults(run=_generate)


def _add_serve(verbs) -> None:
    srv = verbs.add_parser("serve", help="start (or join) Ray, deploy, serve HTTP until Ctrl-C")
    srv.add_argument("--config", help="application config YAML (see configs/); flags given override it")
    add_config_flags(srv, CONFIG_FLAGS, "a tiny random-weight Llama, built on first use")
    srv.add_argument("--address", help="Ray cluster address to join (default: start a local Ray)")
    srv.set_defaults(run=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="LLM serving on Ray with a KV-aware router")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('kvserve')}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    _add_generate(verbs)
    _add_serve(verbs)
    val = verbs.add_parser("validate", help="check a kvserve config, a Serve config, a ray up YAML or a KubeRay manifest")
    val.add_argument("config", help="the YAML file")
    val.add_argument("--crds", help="folder of the KubeRay CRD schemas, for manifests (default: the "
                     "repository's k8s/crds)")
    val.set_defaults(run=_validate)
    bench = verbs.add_parser("bench", help="benchmarks")
    bench_verbs = bench.add_subparsers(dest="bench_verb", required=True, parser_class=_LazyVerbParser)
    for name, help_text, add_flags in BENCHES:
        bench_verbs.add_parser(name, help=help_text, add_flags=add_flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        for line in str(error).splitlines():
            print(f"kvserve {args.verb}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
