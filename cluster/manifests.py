"""Checks of KubeRay manifests (`RayCluster`, `RayService`) without a cluster.

Each problem is one line, "path: problem", the path naming the place in the document, e.g.
`spec.rayClusterConfig.headGroupSpec.rayStartParams.foo: unknown key` or
`spec.serveConfigV2.applications[0].args.engine.tp_size: Input should be greater than or equal to 1`.

A manifest is checked against the OpenAPI schema of its CRD (given by the caller, see
`load_crd_schemas`), made as strict as the Kubernetes API server: unknown fields are refused.
Then come a few rules KubeRay checks in code, the Serve config of a RayService (Serve's
`ServeDeploySchema`, unknown keys refused, which Serve itself ignores; for kvserve's application
its deployments and `args`), and whether the GPU workers can hold the engine replicas.
"""

import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError
from ray.scripts.scripts import start as ray_start
from ray.serve.schema import ServeDeploySchema

from kvserve.cluster.config import AppConfig, ClusterConfig, is_cluster_config
from kvserve.cluster.documents import Location, dotted, pydantic_problems, schema_problems

APP_IMPORT_PATH = "kvserve.cluster.app:app_builder"
MODEL_APP_IMPORT_PATH = "kvserve.cluster.app:model_app_builder"
APP_DEPLOYMENTS = ("Ingress", "LLMServer")
API_VERSION = "ray.io/v1"
GPU = "nvidia.com/gpu"
METADATA_KEYS = ("name", "namespace", "labels", "annotations")
# KubeRay refuses longer names: the services it derives from them must fit 63 characters.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayService": 47}
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")

# -- the CRD schemas -----------------------------------------------------------------------------


def load_crd_schemas(folder: str | Path) -> dict[str, dict]:
    """kind -> the strict `v1` schema of each CRD file (`*.yaml`) in `folder`."""
    schemas = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[crd["spec"]["names"]["kind"]] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


def strict_schema(schema: dict) -> dict:
    """A copy of an OpenAPI schema that refuses unknown keys wherever the API server does:
    every object schema with `properties`, unless it keeps unknown fields or says what other
    keys may hold. A required field with a default is not missing: the server fills it in."""
    strict = dict(schema)
    if "properties" in schema:
        strict["properties"] = {name: strict_schema(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            strict["additionalProperties"] = False
        strict["required"] = [
            name for name in schema.get("required", []) if "default" not in schema["properties"].get(name, {})
        ]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            strict[key] = strict_schema(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            strict[key] = [strict_schema(sub) for sub in schema[key]]
    return strict


# -- a whole manifest ----------------------------------------------------------------------------


def validate_kuberay(document, schemas: dict[str, dict]) -> list[str]:
    """Every problem of a RayCluster or RayService manifest; none: the list is empty."""
    problems = _header_problems(document, schemas)
    if not problems:
        problems = schema_problems(document, schemas[document["kind"]])
    if not problems:
        problems = _metadata_problems(document) + _spec_problems(document)
    return problems


def _header_problems(document, schemas: dict[str, dict]) -> list[str]:
    if not isinstance(document, dict):
        return ["(document): must be a mapping"]
    if document.get("apiVersion") != API_VERSION:
        return [f"apiVersion: must be {API_VERSION}, not {document.get('apiVersion')!r}"]
    kind = document.get("kind")
    if not isinstance(kind, str) or kind not in schemas:
        return [f"kind: must be one of {', '.join(sorted(schemas))}, not {kind!r}"]
    if "spec" not in document:
        return ["spec: missing (required)"]
    return []


def _spec_problems(document: dict) -> list[str]:
    spec = document["spec"]
    if document["kind"] == "RayCluster":
        return _cluster_problems(spec, ["spec"])
    problems = (
        _cluster_problems(spec["rayClusterConfig"], ["spec", "rayClusterConfig"])
        + _upgrade_problems(spec)
        + serve_config_problems(spec.get("serveConfigV2"), ["spec", "serveConfigV2"])
    )
    return problems or _capacity_problems(spec)


def _metadata_problems(document: dict) -> list[str]:
    """The CRD schema says only that metadata is an object; the server and KubeRay say more."""
    metadata = document.get("metadata", {})
    problems = [f"metadata.{key}: unknown key" for key in metadata if key not in METADATA_KEYS]
    name = metadata.get("name")
    limit = MAX_NAME_LENGTH[document["kind"]]
    if name is None:
        problems.append("metadata.name: missing (required)")
    elif not isinstance(name, str) or not _is_dns_label(name) or len(name) > limit:
        problems.append(
            f"metadata.name: {name!r} must be at most {limit} characters of a-z, 0-9 and '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return problems


def _is_dns_label(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
    return bool(name) and set(name) <= allowed and name[0].isalpha() and name[-1] != "-"


def _cluster_problems(cluster: dict, location: Location) -> list[str]:
    """What KubeRay and Kubernetes check beyond the schema, for the head and worker groups."""
    groups = [(location + ["headGroupSpec"], cluster["headGroupSpec"])]
    groups += [(location + ["workerGroupSpecs", i], g) for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
    problems = []
    for group_location, group in groups:
        problems += _group_problems(group, group_location)
    return problems


def _group_problems(group: dict, location: Location) -> list[str]:
    problems = []
    if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31 - 1):
        problems.append(f"{dotted(location + ['minReplicas'])}: more than maxReplicas ({group['maxReplicas']})")
    problems += _ray_start_params_problems(group.get("rayStartParams", {}), location + ["rayStartParams"])
    ray_start_resources = {"num-cpus", "num-gpus", "memory", "resources"} & set(group.get("rayStartParams", {}))
    if ray_start_resources and group.get("resources"):
        problems.append(
            f"{dotted(location + ['resources'])}: set together with rayStartParams "
            f"{', '.join(sorted(ray_start_resources))}; KubeRay takes only one of them"
        )
    for i, container in enumerate(group["template"].get("spec", {}).get("containers", [])):
        problems += _gpu_request_problems(container, location + ["template", "spec", "containers", i, "resources"])
    return problems


def _ray_start_params_problems(params: dict, location: Location) -> list[str]:
    """KubeRay passes each key to `ray start` as an option, but refuses `labels`."""
    options = {name.lstrip("-") for param in ray_start.params for name in param.opts if name.startswith("--")}
    problems = []
    for key in params:
        if key == "labels":
            problems.append(f"{dotted(location + [key])}: KubeRay refuses it; use the group's labels field")
        elif key not in options:
            problems.append(f"{dotted(location + [key])}: unknown key (not an option of `ray start`)")
    return problems


def _gpu_request_problems(container: dict, location: Location) -> list[str]:
    """Kubernetes takes extended resources such as GPUs only with requests equal to limits."""
    resources = container.get("resources", {})
    requested = resources.get("requests", {}).get(GPU)
    limit = resources.get("limits", {}).get(GPU)
    if requested is not None and str(requested) != str(limit):
        return [f"{dotted(location + ['requests', GPU])}: {requested} GPUs requested but the limit is {limit}"]
    return []


def _upgrade_problems(spec: dict) -> list[str]:
    """KubeRay's own rules for the upgrade strategy of a RayService."""
    kind = spec.get("upgradeStrategy", {}).get("type", "NewCluster")
    if kind not in UPGRADE_TYPES:
        return [f"spec.upgradeStrategy.type: must be one of {', '.join(UPGRADE_TYPES)}, not {kind!r}"]
    problems = []
    if "upgradeStrategy" in spec["rayClusterConfig"]:
        problems.append("spec.rayClusterConfig.upgradeStrategy: KubeRay refuses it in a RayService; "
                        "use spec.upgradeStrategy")
    if kind == "NewClusterWithIncrementalUpgrade":
        problems += _incremental_upgrade_problems(spec)
    return problems


def _incremental_upgrade_problems(spec: dict) -> list[str]:
    location = ["spec", "upgradeStrategy", "clusterUpgradeOptions"]
    options = spec["upgradeStrategy"].get("clusterUpgradeOptions")
    if options is None:
        return [f"{dotted(location)}: missing (required by NewClusterWithIncrementalUpgrade)"]
    problems = []
    if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
        problems.append("spec.rayClusterConfig.enableInTreeAutoscaling: must be true for "
                        "NewClusterWithIncrementalUpgrade")
    surge, step = options.get("maxSurgePercent", 100), options["stepSizePercent"]
    if not 0 <= surge <= 100:
        problems.append(f"{dotted(location + ['maxSurgePercent'])}: must be between 0 and 100, not {surge}")
    if not 0 <= step <= surge:
        problems.append(f"{dotted(location + ['stepSizePercent'])}: must be between 0 and maxSurgePercent "
                        f"({surge}), not {step}")
    if options["intervalSeconds"] <= 0:
        problems.append(f"{dotted(location + ['intervalSeconds'])}: must be greater than 0")
    if not options["gatewayClassName"]:
        problems.append(f"{dotted(location + ['gatewayClassName'])}: must name a GatewayClass")
    return problems


# -- the Serve config ----------------------------------------------------------------------------


def serve_config_problems(config, location: Location) -> list[str]:
    """A Serve config (YAML text, as in `serveConfigV2`, or a mapping) against Serve's schema,
    and kvserve's applications in it against kvserve's config."""
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError as error:
            return [f"{dotted(location)}: not valid YAML: {error}".splitlines()[0]]
    if not isinstance(config, dict):
        return [f"{dotted(location)}: must be a Serve config, a mapping with `applications`"]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as error:
        return pydantic_problems(error, location)
    problems = unknown_keys(ServeDeploySchema, config, location)
    apps = config.get("applications", [])
    for i, app in enumerate(apps):
        app_location = location + ["applications", i]
        if app.get("import_path") == APP_IMPORT_PATH and is_cluster_config(app.get("args")):
            problems += _ingress_app_problems(app, apps, app_location)
        elif app.get("import_path") == APP_IMPORT_PATH:
            problems += _app_problems(app, app_location, AppConfig, APP_DEPLOYMENTS)
        elif app.get("import_path") == MODEL_APP_IMPORT_PATH:
            problems += _app_problems(app, app_location, AppConfig, ("LLMServer",))
    return problems


def unknown_keys(model: type[BaseModel], data, location: Location) -> list[str]:
    """Keys a pydantic model would silently ignore, in it and in the models it nests."""
    if not isinstance(data, dict):
        return []
    problems = [f"{dotted(location + [key])}: unknown key" for key in data if key not in model.model_fields]
    for name, field in model.model_fields.items():
        nested = _models_in(field.annotation)
        value = data.get(name)
        if not nested or value is None:
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            item_location = location + [name] + ([] if index is None else [index])
            problems += unknown_keys(nested[0], item, item_location)
    return problems


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]


def _app_problems(app: dict, location: Location, config_model: type[BaseModel], deployments: tuple) -> list[str]:
    problems = [
        f"{dotted(location + ['deployments', i, 'name'])}: the application has no deployment "
        f"{deployment.get('name')!r}, only {', '.join(deployments)}"
        for i, deployment in enumerate(app.get("deployments", []))
        if deployment.get("name") not in deployments
    ]
    try:
        config_model.model_validate(app.get("args") or {})
    except ValidationError as error:
        problems += pydantic_problems(error, location + ["args"])
    return problems


def _ingress_app_problems(app: dict, apps: list[dict], location: Location) -> list[str]:
    """The ingress of several models: its config, and an application of each model beside it,
    named as the ingress looks it up."""
    from kvserve.router.served_model import model_app_name

    problems = _app_problems(app, location, ClusterConfig, ("Ingress",))
    if problems:
        return problems
    model_apps = {a.get("name"): a.get("import_path") for a in apps}
    for i, name in enumerate(ClusterConfig.model_validate(app["args"]).served_model_names()):
        expected = model_app_name(app.get("name", "default"), name)
        if model_apps.get(expected) != MODEL_APP_IMPORT_PATH:
            problems.append(f"{dotted(location + ['args', 'models', i])}: the model {name!r} needs an application "
                            f"named {expected!r} with import_path {MODEL_APP_IMPORT_PATH}")
    return problems


# -- whether the GPU workers hold the engine replicas ---------------------------------------------


def _capacity_problems(spec: dict) -> list[str]:
    """For kvserve's application in a RayService whose config passed the checks above."""
    config = yaml.safe_load(spec["serveConfigV2"])
    groups = spec["rayClusterConfig"].get("workerGroupSpecs", [])
    problems = []
    for i, app in enumerate(config.get("applications", [])):
        holds_a_model = (app.get("import_path") == MODEL_APP_IMPORT_PATH
                         or app.get("import_path") == APP_IMPORT_PATH and not is_cluster_config(app.get("args")))
        if holds_a_model:
            problems += _app_capacity_problems(app, groups, ["spec", "serveConfigV2", "applications", i])
    return problems


def _app_capacity_problems(app: dict, groups: list[dict], location: Location) -> list[str]:
    config = AppConfig.model_validate(app.get("args") or {})
    index, options = _deployment_options(app, "LLMServer")
    gpus, gpus_key = replica_gpus(config, options, ["deployments", index])
    replicas, replicas_key = max_replicas(config, options, ["deployments", index])
    pod_gpus = [worker_gpus(group) for group in groups]
    largest = max(pod_gpus, default=0)
    capacity = sum(gpus_of_pod * group.get("maxReplicas", 0) for gpus_of_pod, group in zip(pod_gpus, groups))
    if config.engine.tp_size > 1 and config.engine.tp_size > largest:
        return [f"{dotted(location + ['args', 'engine', 'tp_size'])}: {config.engine.tp_size} ranks share one "
                f"node, but the largest worker pod has {_gpus(largest)}"]
    if gpus == 0 and largest:
        return [f"{dotted(location + gpus_key)}: LLMServer asks for no GPU but the workers have GPUs: "
                "the engine would run on the CPU"]
    if gpus > largest:
        return [f"{dotted(location + gpus_key)}: an LLMServer replica needs {_gpus(gpus)} on one node, "
                f"but the largest worker pod has {_gpus(largest)}"]
    if replicas * gpus > capacity:
        return [f"{dotted(location + replicas_key)}: {replicas} replicas of {_gpus(gpus)} need "
                f"{_gpus(replicas * gpus)}, but the worker groups hold at most {_gpus(capacity)} (maxReplicas)"]
    return []


def _gpus(count: float) -> str:
    return f"{count:g} GPU" + ("" if count == 1 else "s")


def _deployment_options(app: dict, name: str) -> tuple[int | None, dict]:
    for i, deployment in enumerate(app.get("deployments", [])):
        if deployment.get("name") == name:
            return i, deployment
    return None, {}


def replica_gpus(config: AppConfig, options: dict, options_key: Location) -> tuple[float, Location]:
    """GPUs one engine replica takes, and the key in the application that decides it.
    `options` are the deployment's Serve options (at `options_key`); where set, they replace the
    builder's: its placement group of a GPU per rank when the model runs on worker actors
    (`device: auto` puts them on GPUs in a cluster with GPUs), else the replica's own GPUs."""
    if "placement_group_bundles" in options:
        gpus = sum(bundle.get("GPU", 0) for bundle in options["placement_group_bundles"])
        return gpus, options_key + ["placement_group_bundles"]
    engine = config.engine
    if engine.uses_workers:
        return (0 if engine.device == "cpu" else engine.tp_size), ["args", "engine", "tp_size"]
    if "ray_actor_options" in options:
        return options["ray_actor_options"].get("num_gpus", 0), options_key + ["ray_actor_options", "num_gpus"]
    return config.serving.replica_gpus, ["args", "serving", "replica_gpus"]


def max_replicas(config: AppConfig, options: dict, options_key: Location) -> tuple[int, Location]:
    """The most engine replicas Serve may run, and the key in the application that decides it;
    `num_replicas: auto` without an autoscaling_config counts as 0."""
    if options.get("autoscaling_config"):
        autoscaling = options["autoscaling_config"]
        return autoscaling.get("max_replicas", 1), options_key + ["autoscaling_config", "max_replicas"]
    if "num_replicas" in options:
        replicas = options["num_replicas"]
        return (replicas if isinstance(replicas, int) else 0), options_key + ["num_replicas"]
    return config.serving.replicas, ["args", "serving", "replicas"]


def worker_gpus(group: dict) -> int:
    """GPUs Ray sees on a pod of the group: rayStartParams' num-gpus, else the Ray container's
    (the first) GPU limit."""
    if "num-gpus" in group.get("rayStartParams", {}):
        return int(group["rayStartParams"]["num-gpus"])
    containers = group["template"].get("spec", {}).get("containers", [{}])
    return int(containers[0].get("resources", {}).get("limits", {}).get(GPU, 0))
