"""`kvserve validate`: any document that deploys kvserve, checked without deploying it.

A kvserve config, a Serve config (`serve run` / `serve deploy`), a `ray up` cluster YAML or a
KubeRay manifest (`RayService`, `RayCluster`; other Kubernetes objects beside them are passed
over): the kind is told from the document itself, and every problem comes back as one line
that starts with its path in the document."""

import copy
import json
from pathlib import Path

import yaml

from kvserve.cluster.config import ConfigError, is_cluster_config, parse_cluster_config, parse_config
from kvserve.cluster.documents import schema_problems

# A clone (or an editable install) of the repository keeps the KubeRay CRDs here.
DEFAULT_CRDS = Path(__file__).resolve().parents[1] / "k8s" / "crds"


def document_kind(document) -> str:
    if not isinstance(document, dict):
        return "unknown"
    if str(document.get("apiVersion", "")).startswith("ray.io/"):
        return "kuberay"
    if "apiVersion" in document:
        return "kubernetes"
    if "applications" in document:
        return "serve"
    if "provider" in document or "available_node_types" in document:
        return "ray-up"
    return "kvserve"


def validate_file(
    path: str | Path, crds: str | Path | None = None, default_model: str | None = None
) -> tuple[list[str], list[str]]:
    """The kinds of the documents in `path` and every problem found in them. A kvserve config
    that names no model gets `default_model`, as `kvserve serve` gives it the built-in one."""
    crds = crds or DEFAULT_CRDS
    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    kinds, problems = [], []
    for document in documents:
        kind = document_kind(document)
        if kind == "kvserve" and default_model and isinstance(document.get("engine"), dict):
            document["engine"].setdefault("model", default_model)
        kinds.append(f"{document['kind']} (not checked)" if kind == "kubernetes" else kind)
        problems += CHECKS[kind](document, crds)
    return kinds, problems


def _kvserve_problems(document, _crds) -> list[str]:
    try:
        if is_cluster_config(document):
            models = parse_cluster_config(document).models
            return [f"models[{i}].{problem}" for i, model in enumerate(models) for problem in _model_problems(model)]
        return _model_problems(parse_config(document))
    except ConfigError as error:
        return str(error).removeprefix("invalid config: ").split("; ")


def _model_problems(config) -> list[str]:
    """The checkpoint against the engine settings, where the checkpoint is here to read."""
    from kvserve.cluster.preflight import check_model

    return check_model(config.engine) if Path(config.engine.model).is_dir() else []


def _serve_problems(document, _crds) -> list[str]:
    from kvserve.cluster.manifests import serve_config_problems

    return serve_config_problems(document, [])


def _kuberay_problems(document, crds) -> list[str]:
    from kvserve.cluster.manifests import load_crd_schemas, validate_kuberay

    if not Path(crds, "ray.io_rayservices.yaml").is_file():
        return [f"(document): the KubeRay CRD schemas are not in {crds}: pass --crds with the folder of "
                "ray.io_rayclusters.yaml and ray.io_rayservices.yaml"]
    return validate_kuberay(document, load_crd_schemas(crds))


def _ray_up_problems(document, _crds) -> list[str]:
    """The wheel's own schema, then what `ray up` itself refuses (it fills defaults first)."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    problems = schema_problems(document, schema)
    if problems:
        return problems
    try:
        validate_config(prepare_config(copy.deepcopy(document)))
    except Exception as error:  # ray up's refusal, whatever its type
        return [f"(document): ray up refuses it: {error}".splitlines()[0]]
    return []


def _unknown_problems(document, _crds) -> list[str]:
    return [f"(document): not a kvserve, Serve, ray up or KubeRay document: {type(document).__name__}"]


CHECKS = {
    "kubernetes": lambda document, crds: [],  # another API's object (a volume claim, a pod)
    "kvserve": _kvserve_problems,
    "serve": _serve_problems,
    "kuberay": _kuberay_problems,
    "ray-up": _ray_up_problems,
    "unknown": _unknown_problems,
}
