"""Builds the Serve applications from a kvserve config.

One model (`AppConfig`): one application, the ingress and the LLMServer replicas. Several
models (`ClusterConfig`): one application per model holding its LLMServer deployment alone, named
`<app_name>-<served model name>`, and the ingress's application, whose handles reach them by
name. A `serve deploy` that adds or removes a model then changes only that model's application
and the ingress's: Serve versions a deployment by its application's `args`, so models sharing one
application would all restart.

`app_builder` is the import path that Serve config files (`serve run`, `serve deploy`) and
KubeRay's `serveConfigV2` name: `kvserve.cluster.app:app_builder`, with the kvserve config as
the application's `args` (with several models: the ingress's application alone); each model's
application names `kvserve.cluster.app:model_app_builder` with that model's config. The
deployments' Serve options set here (replicas, resources, placement, queue limits) are defaults
that a Serve config's `deployments:` entries override.
"""

from ray import serve
from ray.serve.config import RequestRouterConfig

from kvserve.cluster.config import AppConfig, ClusterConfig, is_cluster_config, parse_cluster_config, parse_config
from kvserve.router.ingress import Ingress
from kvserve.router.policies import policy_class
from kvserve.router.served_model import LLM_DEPLOYMENT, IngressSettings, model_app_name
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.gguf_checkpoint import tokenizer_args
from kvserve.workers.server import LLMServer
from kvserve.workers.runner.tp_executor import placement_bundles, rank_device


def router_config(config: AppConfig) -> RequestRouterConfig:
    serving = config.serving
    kwargs = {}
    if serving.router == "kv":
        kwargs = {"block_size": config.engine.block_size, "kv_event_hubs": serving.event_hubs(),
                  **serving.router_options.model_dump()}
    return RequestRouterConfig(
        request_router_class=policy_class(serving.router),
        request_router_kwargs=kwargs,
    )


def ingress_settings(config: AppConfig) -> IngressSettings:
    engine = config.engine
    model = ModelConfig.from_pretrained_dir(engine.model)
    tokenizer = tokenizer_args(engine.tokenizer_dir)
    return IngressSettings(
        served_model_name=config.served_model_name(),
        block_size=engine.block_size,
        max_model_len=engine.effective_max_model_len(model),
        tokenizer=tokenizer["pretrained_model_name_or_path"],
        tokenizer_gguf_file=tokenizer["gguf_file"],
        api_key=config.serving.api_key,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        normalize_embeddings=engine.normalize_embeddings,
        max_n=config.serving.max_n,
        max_stop_strings=config.serving.max_stop_strings,
        max_request_bytes=config.serving.max_request_bytes,
        metrics_need_api_key=config.serving.metrics_need_api_key,
        tool_parser=config.serving.tool_parser,
        reasoning_parser=config.serving.reasoning_parser,
        enable_lora=engine.enable_lora,
        lora_modules=dict(engine.lora_modules),
        kv_event_hubs=config.serving.event_hubs(),
    )


def replica_resources(config: AppConfig) -> dict:
    """Deployment options for the replica's resources: with worker actors a placement group
    whose bundles hold the ranks' GPUs (or CPUs), the replica sharing the first with rank 0."""
    serving = config.serving
    if not config.engine.uses_workers:
        return {"ray_actor_options": {"num_cpus": serving.replica_cpus, "num_gpus": serving.replica_gpus}}
    return {
        "ray_actor_options": {"num_cpus": serving.replica_cpus, "num_gpus": 0},
        "placement_group_bundles": placement_bundles(
            config.engine, serving.replica_cpus, rank_device(config.engine)
        ),
        "placement_group_strategy": "STRICT_PACK",
    }


def llm_deployment(config: AppConfig):
    """The bound LLMServer deployment of one model."""
    serving = config.serving
    return serve.deployment(
        LLMServer,
        name=LLM_DEPLOYMENT,
        num_replicas=serving.replicas,
        **replica_resources(config),
        max_ongoing_requests=serving.max_ongoing_requests,
        max_queued_requests=serving.max_queued_requests,
        request_router_config=router_config(config),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=serving.drain_timeout_s,
        graceful_shutdown_wait_loop_s=1.0,
    ).bind(config.engine, serving.step_timeout_s, serving.event_hubs())


def ingress_deployment(config: AppConfig | ClusterConfig):
    return serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=config.serving.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )


def build_app(config: AppConfig):
    """The one application of one model: the ingress and its LLMServer deployment."""
    return ingress_deployment(config).bind([ingress_settings(config)], llm_deployment(config))


def build_cluster_apps(cluster: ClusterConfig) -> dict:
    """Application name -> application: one per model, then the ingress's."""
    name = cluster.serving.app_name
    apps = {model_app_name(name, model.served_model_name()): llm_deployment(model) for model in cluster.models}
    apps[name] = build_ingress_app(cluster)
    return apps


def build_ingress_app(cluster: ClusterConfig):
    """The ingress of several models, each served by its own application."""
    return ingress_deployment(cluster).bind([ingress_settings(model) for model in cluster.models])


def app_builder(args: dict):
    """The application of a Serve config: `args` is a kvserve config (engine, serving); with
    `models`, the ingress's application of several models."""
    if is_cluster_config(args):
        return build_ingress_app(parse_cluster_config(args))
    return build_app(parse_config(args))


def model_app_builder(args: dict):
    """The application of one model of several in a Serve config: `args` is its kvserve config."""
    return llm_deployment(parse_config(args))
