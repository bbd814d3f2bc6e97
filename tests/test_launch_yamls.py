"""The `ray up` YAMLs in cluster/launch/: valid for Ray's own validator and for the JSON schema
the installed wheel ships; broken copies rejected with the path of what is wrong; the Ray token
handed to every node; fixed ports outside Ray's worker port range."""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

LAUNCH = Path(__file__).resolve().parents[1] / "cluster" / "launch"
YAMLS = sorted(LAUNCH.glob("*.yaml"))
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
WORKER_PORTS = range(10002, 20000)  # Ray's default --min-worker-port..--max-worker-port
DELETE = object()

# file -> (where to change it, new value or DELETE, what the schema says, what Ray says if not that)
BROKEN = {
    "aws.yaml": [
        (("available_node_types", "gpu_l40s", "resources"), DELETE,
         "available_node_types.gpu_l40s: 'resources' is a required property", None),
        (("available_node_types", "gpu_l40s", "resources", "GPU"), "one",
         "available_node_types.gpu_l40s.resources.GPU: 'one' is not of type 'integer'", None),
        (("available_node_types", "gpu_l40s", "min_worker"), 1,
         "available_node_types.gpu_l40s: Additional properties are not allowed ('min_worker' was unexpected)", None),
    ],
    "gcp.yaml": [
        (("available_node_types", "gpu_a100", "node_config"), DELETE,
         "available_node_types.gpu_a100: 'node_config' is a required property", None),
        (("available_node_types", "gpu_a100", "max_workers"), "4",
         "available_node_types.gpu_a100.max_workers: '4' is not of type 'integer'", None),
        (("available_node_types", "gpu_a100", "resource"), {"GPU": 1},
         "available_node_types.gpu_a100: Additional properties are not allowed ('resource' was unexpected)", None),
    ],
    "local.yaml": [
        # Ray fills defaults before it validates; without provider.type it cannot pick them.
        (("provider", "type"), DELETE, "provider: 'type' is a required property", "KeyError: 'type'"),
        (("provider", "worker_ips"), "192.168.1.11",
         "provider.worker_ips: '192.168.1.11' is not of type 'array'", None),
        (("auth", "ssh_usr"), "ubuntu",
         "auth: Additional properties are not allowed ('ssh_usr' was unexpected)", None),
    ],
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def describe(error: jsonschema.ValidationError) -> str:
    return f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"


def schema_problems(config: dict) -> list[str]:
    """What the wheel's ray-schema.json finds wrong with the document as written."""
    return [describe(e) for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(config)]


def ray_problem(config: dict) -> str | None:
    """What `ray up` would refuse the document for: Ray fills in its defaults, then validates."""
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as error:
        return describe(error)
    except Exception as error:  # any other refusal, as Ray words it
        return f"{type(error).__name__}: {error}"
    return None


def test_every_launch_yaml_is_listed():
    assert [p.name for p in YAMLS] == sorted(BROKEN)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_valid_for_ray_and_its_schema(path):
    config = load(path)
    assert schema_problems(config) == []
    assert ray_problem(config) is None


@pytest.mark.parametrize("name, where, value, schema_says, ray_says", [
    pytest.param(name, *case, id=f"{name}:{'.'.join(case[0])}") for name, cases in BROKEN.items() for case in cases])
def test_broken_copy_is_rejected_naming_its_path(name, where, value, schema_says, ray_says):
    config = load(LAUNCH / name)
    *parents, key = where
    target = config
    for part in parents:
        target = target.setdefault(part, {})
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    assert schema_says in schema_problems(config)
    assert ray_problem(config) == (ray_says or schema_says)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_node_gets_the_token_and_uses_it(path):
    config = load(path)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in cmd and ".bashrc" in cmd for cmd in config["setup_commands"])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_fixed_ports_outside_the_worker_port_range(path):
    config = load(path)
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    ports = [int(port) for port in re.findall(r"(?:port=|:)(\d+)\b", commands)]
    assert ports and not [port for port in ports if port in WORKER_PORTS]
