"""The Kubernetes artifacts in k8s/, checked without a cluster: each KubeRay manifest against the
KubeRay v1.7.0 CRDs (k8s/crds/), strict about unknown fields; the RayService's Serve
config against Serve's schema and kvserve's config, and its application built from it; resources
that add up; and broken copies rejected with the path of the problem."""

import copy
import hashlib
import re
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray import serve
from ray.serve._private.build_app import build_app
from ray.serve.schema import ServeDeploySchema

from kvserve.cluster.app import app_builder
from kvserve.cluster.config import ConfigError, parse_config
from kvserve.cluster.manifests import (
    APP_DEPLOYMENTS,
    APP_IMPORT_PATH,
    GPU,
    dotted,
    load_crd_schemas,
    max_replicas,
    replica_gpus,
    schema_problems,
    validate_kuberay,
    worker_gpus,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = Path(__file__).resolve().parents[1] / "k8s" / "crds"
MANIFESTS = ("rayservice.yaml", "raycluster.yaml")
MODEL_VOLUME = "model-pvc.yaml"
MODEL_CLAIM, MODEL_MOUNT = "kvserve-models", "/models"


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    return load_crd_schemas(CRDS)


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def kvserve_app(rayservice: dict) -> dict:
    (app,) = serve_config(rayservice)["applications"]
    return app


def deployment(app: dict, name: str) -> dict:
    return next(d for d in app["deployments"] if d["name"] == name)


def cluster_spec(document: dict) -> dict:
    return document["spec"]["rayClusterConfig"] if document["kind"] == "RayService" else document["spec"]


def groups(document: dict) -> list[dict]:
    spec = cluster_spec(document)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def ray_containers(document: dict) -> list[dict]:
    """The Ray container of each group: KubeRay takes the first."""
    return [group["template"]["spec"]["containers"][0] for group in groups(document)]


def cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# -- the CRDs and the files ----------------------------------------------------------------------


def test_crd_copies_are_the_ones_the_readme_names():
    listed = re.findall(r"^([0-9a-f]{64})  (\S+\.yaml)$", (CRDS / "README.md").read_text(), re.MULTILINE)
    actual = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in CRDS.glob("*.yaml")}
    assert {name: digest for digest, name in listed} == actual
    assert len(actual) == 2


def test_every_yaml_in_k8s_is_checked_here():
    assert sorted(path.name for path in K8S.glob("*.yaml")) == sorted([*MANIFESTS, MODEL_VOLUME])


# -- the manifests against the CRDs and KubeRay's rules -------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid(name, schemas):
    assert validate_kuberay(load(name), schemas) == []


def test_strict_schema_refuses_unknown_keys_deep_in_the_pod_template(schemas):
    document = load("raycluster.yaml")
    document["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"][0]["readonly"] = True
    location = "spec.workerGroupSpecs[0].template.spec.containers[0].volumeMounts[0].readonly"
    assert validate_kuberay(document, schemas) == [f"{location}: unknown key"]


@pytest.mark.parametrize(
    "value, accepted", [(16, True), ("16", True), ("16000m", True), (0.5, False), ("lots", False)], ids=repr
)
def test_int_or_string_quantities(value, accepted, schemas):
    document = load("raycluster.yaml")
    document["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = value
    assert (validate_kuberay(document, schemas) == []) == accepted


# -- the Serve config and the application it builds ----------------------------------------------


def test_serve_config_validates_against_serves_schema():
    config = serve_config(load("rayservice.yaml"))
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == APP_IMPORT_PATH
    assert {d["name"] for d in app["deployments"]} <= set(APP_DEPLOYMENTS)
    assert "target_capacity" not in config  # KubeRay's to set during incremental upgrades


def test_args_are_a_kvserve_config():
    app = kvserve_app(load("rayservice.yaml"))
    config = parse_config(app["args"])
    assert config.serving.app_name == app["name"]
    assert config.engine.model.startswith(MODEL_MOUNT + "/")
    assert config.engine.device == "auto"


def test_import_path_builds_the_application(tiny_checkpoints):
    args = copy.deepcopy(kvserve_app(load("rayservice.yaml"))["args"])
    args["engine"]["model"] = str(tiny_checkpoints["llama"])
    del args["engine"]["max_model_len"]  # the tiny model's context is shorter
    module, _, attribute = APP_IMPORT_PATH.partition(":")
    assert (module, attribute) == (app_builder.__module__, app_builder.__name__)
    app = app_builder(args)
    assert isinstance(app, serve.Application)
    # Serve's own step from application to deployments (what a deploy runs), nothing started.
    built = build_app(app, name=args["serving"]["app_name"])
    assert sorted(d.name for d in built.deployments) == sorted(APP_DEPLOYMENTS)


def test_broken_args_are_refused_with_their_key():
    args = copy.deepcopy(kvserve_app(load("rayservice.yaml"))["args"])
    args["engine"]["tp_size"] = 0
    with pytest.raises(ConfigError, match=r"engine\.tp_size: Input should be greater than or equal to 1"):
        parse_config(args)


# -- resources that add up ----------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_requests_equal_limits(name):
    for container in ray_containers(load(name)):
        assert container["resources"]["requests"] == container["resources"]["limits"], container["name"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_head_has_no_gpu_and_no_ray_cpus(name):
    head = cluster_spec(load(name))["headGroupSpec"]
    assert GPU not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert head["rayStartParams"]["num-cpus"] == "0"


def test_a_gpu_worker_pod_holds_one_engine_replica_and_the_ingress():
    rayservice = load("rayservice.yaml")
    app = kvserve_app(rayservice)
    config = parse_config(app["args"])
    server, ingress = deployment(app, "LLMServer"), deployment(app, "Ingress")
    (workers,) = cluster_spec(rayservice)["workerGroupSpecs"]
    pod_gpus = worker_gpus(workers)
    assert pod_gpus >= config.engine.tp_size
    assert replica_gpus(config, server, [])[0] == pod_gpus
    # The smallest cluster, one GPU pod, holds a replica and every ingress replica.
    asked = server["ray_actor_options"]["num_cpus"] + ingress["num_replicas"] * ingress["ray_actor_options"]["num_cpus"]
    assert asked <= cpus(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


def test_autoscaling_bounds_match_the_worker_group():
    rayservice = load("rayservice.yaml")
    app = kvserve_app(rayservice)
    server = deployment(app, "LLMServer")
    (workers,) = cluster_spec(rayservice)["workerGroupSpecs"]
    assert cluster_spec(rayservice)["enableInTreeAutoscaling"] is True
    assert max_replicas(parse_config(app["args"]), server, [])[0] == workers["maxReplicas"]
    assert server["autoscaling_config"]["min_replicas"] == workers["minReplicas"]


def test_incremental_upgrade_needs_one_spare_gpu_pod_not_a_second_cluster():
    rayservice = load("rayservice.yaml")
    options = rayservice["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"
    (workers,) = cluster_spec(rayservice)["workerGroupSpecs"]
    # Each step adds at least one pod's worth of capacity, and well under the whole cluster.
    assert 100 / workers["maxReplicas"] <= options["maxSurgePercent"] < 100
    assert options["stepSizePercent"] <= options["maxSurgePercent"]


# -- auth, the model volume, ports and the image -------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_token_auth_is_left_to_kuberay(name):
    document = load(name)
    assert cluster_spec(document)["authOptions"] == {"mode": "token"}
    # KubeRay leaves a variable alone that a container sets itself: none may, or they disagree.
    for container in ray_containers(document):
        assert not [env for env in container.get("env", []) if env["name"].startswith("RAY_AUTH")]


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_ray_pod_mounts_the_model_read_only_at_one_path(name):
    for group in groups(load(name)):
        pod = group["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == MODEL_CLAIM]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        assert (mount["mountPath"], mount["readOnly"]) == (MODEL_MOUNT, True)


@pytest.mark.parametrize("name", MANIFESTS)
def test_serve_port_is_named_as_kuberay_expects(name):
    # KubeRay's worker readiness probe and the Serve service find Serve's proxy by this name.
    for container in ray_containers(load(name)):
        assert {"containerPort": 8000, "name": "serve"} in container["ports"]
    assert serve_config(load("rayservice.yaml"))["http_options"]["port"] == 8000


def model_volume_documents() -> list[dict]:
    return list(yaml.safe_load_all((K8S / MODEL_VOLUME).read_text()))


def model_volume_problems(documents: list[dict], schemas: dict[str, dict]) -> list[str]:
    """The claim's and the loader pod's spec against the schemas KubeRay's CRD embeds for them
    (a pod template's spec; an ephemeral volume's claim spec)."""
    claim, loader = documents
    pod_spec = schemas["RayCluster"]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"][
        "properties"]["spec"]
    claim_spec = pod_spec["properties"]["volumes"]["items"]["properties"]["ephemeral"]["properties"][
        "volumeClaimTemplate"]["properties"]["spec"]
    return schema_problems(claim["spec"], claim_spec, ["spec"]) + schema_problems(loader["spec"], pod_spec, ["spec"])


def test_model_volume_and_loader_are_valid(schemas):
    claim, loader = model_volume_documents()
    assert (claim["apiVersion"], claim["kind"], claim["metadata"]["name"]) == ("v1", "PersistentVolumeClaim", MODEL_CLAIM)
    assert (loader["apiVersion"], loader["kind"]) == ("v1", "Pod")
    assert model_volume_problems([claim, loader], schemas) == []
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # mounted by pods on several nodes
    assert loader["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == MODEL_CLAIM


def test_one_image_of_the_ray_version_tested_here():
    dockerfile = (K8S / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert ray_version == ray.__version__
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-cu\d+$", dockerfile, re.MULTILINE)
    images = {container["image"] for name in MANIFESTS for container in ray_containers(load(name))}
    images |= {container["image"] for container in model_volume_documents()[1]["spec"]["containers"]}
    assert len(images) == 1
    assert {cluster_spec(load(name))["rayVersion"] for name in MANIFESTS} == {ray_version}


def test_image_holds_every_package_folder():
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    folders = {path.split("/")[0] for path in package_dirs.values()}
    dockerfile = (K8S / "Dockerfile").read_text()
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    for folder in folders:
        assert re.search(rf"^COPY .* {folder} {folder}$", dockerfile, re.MULTILINE), folder
        assert f"!{folder}/" in ignore, folder


# -- broken copies --------------------------------------------------------------------------------


DELETE = object()


def change(document: dict, location: list, value) -> None:
    """Set the value at `location`, or delete it when `value` is DELETE."""
    *parents, last = location
    node = document
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


RAYSERVICE_CLUSTER = ["spec", "rayClusterConfig"]
RAYSERVICE_WORKER = [*RAYSERVICE_CLUSTER, "workerGroupSpecs", 0]
RAYCLUSTER_WORKER = ["spec", "workerGroupSpecs", 0]
BROKEN = [
    # (manifest, location, new value or DELETE, the expected problem after the location)
    ("rayservice.yaml", [*RAYSERVICE_CLUSTER, "headGroupSpec", "template"], DELETE, "missing (required)"),
    ("rayservice.yaml", [*RAYSERVICE_WORKER, "maxReplicas"], "4", "must be of type integer, not str '4'"),
    ("rayservice.yaml", [*RAYSERVICE_CLUSTER, "headGroupSpec", "rayStartParams", "foo"], "1",
     "unknown key (not an option of `ray start`)"),
    ("rayservice.yaml", ["spec", "serveConfigV3"], "", "unknown key"),
    ("rayservice.yaml", [*RAYSERVICE_WORKER, "template", "spec", "containers", 0, "resources", "requests", GPU], 2,
     "2 GPUs requested but the limit is 1"),
    ("rayservice.yaml", ["spec", "upgradeStrategy", "clusterUpgradeOptions", "stepSizePercent"], 50,
     "must be between 0 and maxSurgePercent (25), not 50"),
    ("rayservice.yaml", [*RAYSERVICE_CLUSTER, "authOptions", "mode"], "tokens",
     "must be one of disabled, token, not 'tokens'"),
    ("rayservice.yaml", ["metadata", "name"], "kvServe", "'kvServe' must be at most 47 characters of a-z, 0-9 and "
     "'-', starting with a letter and ending with a letter or digit"),
    ("raycluster.yaml", [*RAYCLUSTER_WORKER, "groupName"], DELETE, "missing (required)"),
    ("raycluster.yaml", ["spec", "enableInTreeAutoscaling"], "yes", "must be of type boolean, not str 'yes'"),
    ("raycluster.yaml", [*RAYCLUSTER_WORKER, "template", "spec", "containers", 0, "resource"], {}, "unknown key"),
    ("raycluster.yaml", [*RAYCLUSTER_WORKER, "minReplicas"], 3, "more than maxReplicas (2)"),
]


@pytest.mark.parametrize(
    "name, location, value, problem", BROKEN, ids=[f"{name}:{dotted(location)}" for name, location, _, _ in BROKEN]
)
def test_broken_manifest_is_refused_with_its_path(name, location, value, problem, schemas):
    document = load(name)
    change(document, location, value)
    assert validate_kuberay(document, schemas) == [f"{dotted(location)}: {problem}"]


APPLICATION = "spec.serveConfigV2.applications[0]"
BROKEN_SERVE_CONFIG = [
    # (text in serveConfigV2, its replacement, the expected problem)
    ("tp_size: 1", "tp_size: 0", f"{APPLICATION}.args.engine.tp_size: Input should be greater than or equal to 1"),
    ("tp_size: 1", "tp_size: 2", f"{APPLICATION}.args.engine.tp_size: 2 ranks share one node, but the largest "
     "worker pod has 1 GPU"),
    ("router: kv", "router: kv\n        routr: kv", f"{APPLICATION}.args.serving.routr: unknown key"),
    ("name: Ingress", "name: Ingres", f"{APPLICATION}.deployments[1].name: the application has no deployment "
     "'Ingres', only Ingress, LLMServer"),
    ("upscale_delay_s", "upscale_delay", f"{APPLICATION}.deployments[0].autoscaling_config.upscale_delay: unknown key"),
    ("num_gpus: 1", "num_gpus: one", f"{APPLICATION}.deployments[0].ray_actor_options.num_gpus: Input should be a "
     "valid number, unable to parse string as a number"),
    ("num_gpus: 1", "num_gpus: 0", f"{APPLICATION}.deployments[0].ray_actor_options.num_gpus: LLMServer asks for no "
     "GPU but the workers have GPUs: the engine would run on the CPU"),
    ("max_replicas: 4", "max_replicas: 8", f"{APPLICATION}.deployments[0].autoscaling_config.max_replicas: 8 "
     "replicas of 1 GPU need 8 GPUs, but the worker groups hold at most 4 GPUs (maxReplicas)"),
]


@pytest.mark.parametrize("old, new, problem", BROKEN_SERVE_CONFIG, ids=[repr(new) for _, new, _ in BROKEN_SERVE_CONFIG])
def test_broken_serve_config_is_refused_with_its_path(old, new, problem, schemas):
    document = load("rayservice.yaml")
    assert document["spec"]["serveConfigV2"].count(old) == 1
    document["spec"]["serveConfigV2"] = document["spec"]["serveConfigV2"].replace(old, new)
    assert validate_kuberay(document, schemas) == [problem]


BROKEN_MODEL_VOLUME = [
    # (document: 0 the claim, 1 the loader pod; location; new value or DELETE; expected problem)
    (1, ["spec", "containers", 0, "name"], DELETE, "missing (required)"),
    (0, ["spec", "accessModes"], "ReadWriteMany", "must be of type array, not str 'ReadWriteMany'"),
    (1, ["spec", "containers", 0, "volumeMount"], [], "unknown key"),
]


@pytest.mark.parametrize("index, location, value, problem", BROKEN_MODEL_VOLUME,
                         ids=[dotted(location) for _, location, _, _ in BROKEN_MODEL_VOLUME])
def test_broken_model_volume_is_refused_with_its_path(index, location, value, problem, schemas):
    documents = model_volume_documents()
    change(documents[index], location, value)
    assert model_volume_problems(documents, schemas) == [f"{dotted(location)}: {problem}"]
