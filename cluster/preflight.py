"""What can be known before deploying, checked up front. Each problem is one line that names
the config key and the numbers, instead of a replica that never starts or fails deep inside
Serve."""

from dataclasses import dataclass

import ray

from kvserve.cluster.config import AppConfig
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.kv_cache_manager import check_pool_holds_a_sequence
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.parallel_layers import check_shardable
from kvserve.workers.runner.kv_memory import configured_pool_blocks, rank_block_bytes
from kvserve.workers.runner.tp_executor import placement_bundles

Resources = dict[str, float]
UNBOUNDED = 1 << 30


class PreflightError(ValueError):
    """A deployment that cannot work as configured; one line per problem."""


# -- the checkpoint against the engine settings ------------------------------------------------


def check_model(engine: EngineConfig) -> list[str]:
    """Architecture, tensor-parallel split, max_model_len and KV pool, from config.json."""
    try:
        model = ModelConfig.from_pretrained_dir(engine.model)
    except (ValueError, FileNotFoundError, KeyError) as error:
        return [f"engine.model: {error}"]
    problems = []
    try:
        check_shardable(model, engine.tp_size)
    except ValueError as error:
        problems.append(f"engine.tp_size: {error}")
    try:
        max_model_len = engine.effective_max_model_len(model)
    except ValueError as error:
        return problems + [f"engine.max_model_len: {error}"]
    try:
        _check_kv_pool(engine, model, max_model_len)
    except ValueError as error:
        problems.append(f"engine.num_kv_blocks: {error}")
    if engine.speculative is not None and engine.speculative.method == "draft":
        problems += _check_draft_model(engine, model)
    return problems


def _check_draft_model(engine: EngineConfig, model: ModelConfig) -> list[str]:
    """The draft model's vocabulary, tokenizer and length against the target's."""
    from kvserve.workers.runner.draft_model import check_draft_model  # torch and transformers: only here

    try:
        check_draft_model(engine, model, ModelConfig.from_pretrained_dir(engine.speculative.model))
    except ValueError as error:
        return [f"engine.{error}"]
    except (OSError, KeyError) as error:
        return [f"engine.speculative.model: {error}"]
    return []


def _check_kv_pool(engine: EngineConfig, model: ModelConfig, max_model_len: int) -> None:
    """Only where the settings fix the pool's size; on a GPU it is sized after profiling."""
    if engine.device != "cpu" and not engine.num_kv_blocks:
        return
    dtype = engine.kv_cache_torch_dtype(engine.torch_dtype(model.torch_dtype))
    blocks = configured_pool_blocks(engine, rank_block_bytes(engine, model, dtype), on_cuda=False)
    check_pool_holds_a_sequence(blocks, engine.block_size, max_model_len)


# -- resources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    """Nodes of one shape: what each offers, and how many the cluster has or can start."""

    resources: Resources
    max_count: int


def replica_bundles(config: AppConfig, node_types: list[NodeType]) -> list[Resources]:
    """What one engine replica asks Ray for: one bundle, or one per tensor-parallel rank (the
    replica sharing the first), all on one node."""
    serving, engine = config.serving, config.engine
    if not engine.uses_workers:
        return [{"CPU": serving.replica_cpus, "GPU": serving.replica_gpus}]
    device = engine.device
    if device == "auto":
        device = "cuda" if any(t.resources.get("GPU") for t in node_types) else "cpu"
    return placement_bundles(engine, serving.replica_cpus, device)


def cluster_node_types() -> list[NodeType]:
    """The autoscaler's node types when the cluster has any, else the nodes alive now."""
    autoscaling = ray._private.state.state.get_cluster_config()
    if autoscaling is not None and autoscaling.node_group_configs:
        return [
            NodeType(dict(group.resources), UNBOUNDED if group.max_count < 0 else group.max_count)
            for group in autoscaling.node_group_configs
        ]
    return [NodeType(node["Resources"], 1) for node in ray.nodes() if node["Alive"]]


def check_resources(config: AppConfig, node_types: list[NodeType]) -> list[str]:
    """Whether the replicas, each whole on one node, fit the cluster's nodes."""
    per_replica = _sum(replica_bundles(config, node_types))
    replicas = config.serving.replicas
    fitting = sum(t.max_count * _copies(per_replica, t.resources) for t in node_types)
    if fitting >= replicas:
        return []
    largest = max((t.resources for t in node_types), key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    if fitting == 0:
        return [f"{_sizing_key(config)}: one replica needs {_show(per_replica)} on one node; "
                f"the largest node has {_show(largest)}"]
    return [f"serving.replicas: {replicas} replicas need {_show(per_replica)} each, on one node each; "
            f"the cluster has room for {fitting} ({_show(_cluster_total(node_types))} in all)"]


def _sizing_key(config: AppConfig) -> str:
    if config.engine.uses_workers:
        return "engine.tp_size"
    return "serving.replica_gpus" if config.serving.replica_gpus else "serving.replica_cpus"


def _copies(need: Resources, node: Resources) -> int:
    """How many times `need` fits in one node of `node`'s resources."""
    counts = [int(node.get(name, 0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return min(counts, default=UNBOUNDED)


def _sum(bundles: list[Resources]) -> Resources:
    total: Resources = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0) + amount
    return {name: amount for name, amount in total.items() if amount > 0}


def _cluster_total(node_types: list[NodeType]) -> Resources:
    return _sum([{n: a * t.max_count for n, a in t.resources.items() if n in ("CPU", "GPU")} for t in node_types])


def _show(resources: Resources) -> str:
    shown = [f"{amount:g} {name}" for name, amount in sorted(resources.items()) if name in ("CPU", "GPU")]
    return ", ".join(shown) or "nothing"


# -- a local CPU run -----------------------------------------------------------------------------


def fit_to_cpus(config: AppConfig, num_cpus: float) -> AppConfig:
    """On a machine with fewer cores than the replicas and ranks would reserve, the same
    deployment with fractional CPU reservations that add up to `num_cpus`."""
    engine, serving = config.engine, config.serving
    ranks = engine.tp_size if engine.uses_workers else 0
    wanted = serving.replicas * (serving.replica_cpus + ranks * engine.rank_cpus)
    if wanted <= num_cpus:
        return config
    scale = int(num_cpus / wanted * 100) / 100  # rounded down: the sums must stay within num_cpus
    return config.model_copy(update={
        "engine": engine.model_copy(update={"rank_cpus": engine.rank_cpus * scale}),
        "serving": serving.model_copy(update={"replica_cpus": serving.replica_cpus * scale}),
    })


def check(config: AppConfig, node_types: list[NodeType]) -> None:
    """Raise PreflightError with every problem found, one per line."""
    problems = check_model(config.engine) + check_resources(config, node_types)
    if problems:
        raise PreflightError("\n".join(problems))
