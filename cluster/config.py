"""The application config: one pydantic tree, filled from a YAML file and CLI flags."""

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvserve.cluster.documents import pydantic_problems
from kvserve.router.options import Policy, RouterOptions
from kvserve.workers.engine.config import EngineConfig


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
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica takes at once")
    max_queued_requests: int = Field(512, ge=-1, description="requests waiting for a replica before 503s; -1: no limit")
    api_key: str | None = Field(None, description="the bearer token clients must send; default: none needed")
    host: str = Field("127.0.0.1", description="address the HTTP server listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the HTTP server listens on")
    deploy_timeout_s: float = Field(
        120.0, gt=0, description="how long `kvserve serve` waits for the application to run before it fails, "
        "saying what blocks it"
    )


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig
    serving: ServingConfig = ServingConfig()

    def served_model_name(self) -> str:
        return self.serving.served_model_name or Path(self.engine.model).name


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


def load_config(path: str | Path | None, overrides: dict | None = None, default_model=None) -> AppConfig:
    """Read `path` (YAML), apply `overrides` ({"engine": {...}, "serving": {...}}), and fill
    `engine.model` from `default_model()` when neither gives one."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {})
        raw[section].update({k: v for k, v in values.items() if v is not None})
    engine = raw.setdefault("engine", {})
    if isinstance(engine, dict) and not engine.get("model") and default_model is not None:
        engine["model"] = default_model()
    return parse_config(raw)


def parse_config(raw: dict) -> AppConfig:
    """The config of a mapping (a YAML file's, or a Serve config's application `args`)."""
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("invalid config: " + "; ".join(pydantic_problems(error, []))) from None
