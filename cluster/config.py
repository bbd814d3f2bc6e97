"""The application config: one pydantic tree, filled from a YAML file and CLI flags."""

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvserve.cluster.documents import pydantic_problems
from kvserve.router.options import Policy, RouterOptions
from kvserve.workers.engine.config import EngineConfig

API_KEY_ENV = "KVSERVE_API_KEY"


# One hub actor takes about this many replicas' publishes (one per replica at most every
# PUBLISH_PERIOD_S while it works) and answers the routers' polls of them.
REPLICAS_PER_HUB = 128


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app_name: str = Field("kvserve", description="the Ray Serve application's name")
    served_model_name: str | None = Field(None, description="the model id clients use; default: the folder name")
    replicas: int = Field(1, ge=1, description="engine replicas, each with its own KV cache")
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress that routes requests")
    router: Policy = Field("kv", description="how the ingress picks a replica for each request")
    router_options: RouterOptions = Field(RouterOptions(), description="settings of the `kv` routing policy")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each engine replica")
    replica_gpus: float = Field(
        0.0, ge=0, description="GPUs Ray reserves for each engine replica that runs its model in process; "
        "worker actors reserve their own"
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="requests one replica takes at once; default: `engine.max_num_seqs`, a full batch "
        "(the rest wait in Serve's queue, where the router still chooses their replica)"
    )
    max_queued_requests: int = Field(512, ge=-1, description="requests waiting for a replica before 429s; -1: no limit")
    step_timeout_s: float = Field(
        60.0, gt=0, description="longest an engine may go without finishing a step while it has work before "
        "its replica reports unhealthy (Serve then replaces it) and its waiting clients get an error"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="how long a replica that is shut down or redeployed keeps serving the requests "
        "it already has before it is stopped"
    )
    api_key: str | None = Field(
        None, validate_default=True, description="the key clients must send on /v1/* as "
        "`Authorization: Bearer <key>`; default: $KVSERVE_API_KEY, else none needed"
    )
    metrics_need_api_key: bool = Field(False, description="whether /metrics needs the API key too")
    host: str = Field("127.0.0.1", description="address the HTTP server listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the HTTP server listens on")
    max_n: int = Field(16, ge=1, description="the most samples (`n`) one request may ask for")
    tool_parser: Literal["hermes", "llama3_json", "mistral"] | None = Field(
        None, description="how the model writes tool calls; default: read from its chat template, else its model type"
    )
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = Field(
        None, description="how a reasoning model marks its thinking, which chat answers then carry apart as "
        "`reasoning_content`; default: none, the thinking stays in `content`"
    )
    max_stop_strings: int = Field(
        16, ge=0, description="the most stop strings one request may give (OpenAI allows 4, vLLM any number)"
    )
    max_request_bytes: int = Field(
        4 * 2**20, ge=1024, description="the largest request body the ingress reads; larger ones get 413"
    )
    kv_event_hubs: int | None = Field(
        None, ge=1, description="hub actors that relay the replicas' KV events and load to the routers, each "
        f"for a share of the replicas; default: one per {REPLICAS_PER_HUB} replicas"
    )
    deploy_timeout_s: float = Field(
        120.0, gt=0, description="how long `kvserve serve` waits for the application to run before it fails, "
        "saying what blocks it"
    )

    def event_hubs(self) -> int:
        """`kv_event_hubs`, or its default for `replicas`."""
        return self.kv_event_hubs or -(-self.replicas // REPLICAS_PER_HUB)

    @field_validator("api_key")
    @classmethod
    def _api_key_from_environment(cls, key: str | None) -> str | None:
        """A key the config or a flag gives wins over $KVSERVE_API_KEY."""
        return key or os.environ.get(API_KEY_ENV) or None


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig
    serving: ServingConfig = Field(default_factory=ServingConfig)  # reads $KVSERVE_API_KEY when built

    @model_validator(mode="after")
    def _a_replica_takes_a_full_batch(self):
        if self.serving.max_ongoing_requests is None:
            update = {"max_ongoing_requests": self.engine.max_num_seqs}
            self.serving = self.serving.model_copy(update=update)
        return self

    def served_model_name(self) -> str:
        return self.serving.served_model_name or Path(self.engine.model).name


# The front door's settings: one value for the whole cluster, set under the top-level `serving`.
FRONT_DOOR_FIELDS = ("app_name", "ingress_replicas", "api_key", "metrics_need_api_key", "host", "port",
                     "max_request_bytes", "deploy_timeout_s")


class ClusterConfig(BaseModel):
    """Several base models behind one ingress. Each entry of `models` is a one-model config whose
    `serving` holds only what differs from the top-level `serving` (replicas, router, resources,
    the served name); the front door's settings come from the top level alone."""

    model_config = ConfigDict(extra="forbid")

    serving: ServingConfig = Field(default_factory=ServingConfig)
    models: list[AppConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _models_inherit_serving(cls, raw):
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
            return raw
        shared = raw.get("serving") or {}
        if not isinstance(shared, dict):
            return raw
        models = [_inherit_serving(model, shared, i) for i, model in enumerate(raw["models"])]
        return {**raw, "models": models}

    @model_validator(mode="after")
    def _names_are_distinct(self):
        names = self.served_model_names()
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"models: served model names must differ; {repeated} is served twice "
                             "(set serving.served_model_name)")
        return self

    def served_model_names(self) -> list[str]:
        return [model.served_model_name() for model in self.models]


def _inherit_serving(model, shared: dict, index: int):
    if not isinstance(model, dict) or not isinstance(model.get("serving", {}), dict):
        return model
    own = model.get("serving", {})
    front_door = sorted(set(own) & set(FRONT_DOOR_FIELDS))
    if front_door:
        raise ValueError(f"models[{index}].serving: {front_door} apply to the whole cluster: "
                         "set them under the top-level serving")
    return {**model, "serving": {**shared, **own}}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


def load_config(path: str | Path | None, overrides: dict | None = None, default_model=None) -> AppConfig:
    """Read `path` (YAML), apply `overrides` ({"engine": {...}, "serving": {...}}), and fill
    `engine.model` from `default_model()` when neither gives one."""
    raw = _read_config_file(path) if path is not None else {}
    _apply_overrides(raw, overrides or {})
    engine = raw.setdefault("engine", {})
    if isinstance(engine, dict) and not engine.get("model") and default_model is not None:
        engine["model"] = default_model()
    return parse_config(raw)


def load_serving_config(path: str | Path | None, overrides: dict | None = None,
                        default_model=None) -> AppConfig | ClusterConfig:
    """`load_config`, or the `ClusterConfig` of a file with `models`; its flags set the top-level
    `serving` (what every model inherits), and none may set an engine: which model's would it be?"""
    raw = _read_config_file(path) if path is not None else {}
    if not is_cluster_config(raw):
        return load_config(path, overrides, default_model)
    overrides = overrides or {}
    engine_flags = sorted(k for k, v in overrides.get("engine", {}).items() if v is not None)
    if engine_flags:
        raise ConfigError(f"engine.{engine_flags[0]}: a config of several models sets each model's engine "
                          "under models[i].engine, not with a flag")
    _apply_overrides(raw, {"serving": overrides.get("serving", {})})
    return parse_cluster_config(raw)


def _read_config_file(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def _apply_overrides(raw: dict, overrides: dict) -> None:
    for section, values in overrides.items():
        raw.setdefault(section, {})
        raw[section].update({k: v for k, v in values.items() if v is not None})


def parse_config(raw: dict) -> AppConfig:
    """The config of a mapping (a YAML file's, or a Serve config's application `args`)."""
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("invalid config: " + "; ".join(pydantic_problems(error, []))) from None


def parse_cluster_config(raw: dict) -> ClusterConfig:
    """The config of a mapping with `models` (several base models)."""
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("invalid config: " + "; ".join(pydantic_problems(error, []))) from None


def is_cluster_config(raw) -> bool:
    return isinstance(raw, dict) and "models" in raw
