"""`kvserve validate` on every kind of document that deploys kvserve: each YAML the repository
ships passes, and a broken copy of each kind is refused with the path of what is wrong."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvserve.cluster.validate import document_kind, validate_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("cluster/launch/*.yaml"), *ROOT.glob("k8s/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_is_valid(path, tiny_checkpoints):
    kinds, problems = validate_file(path, default_model=str(tiny_checkpoints["llama"]))
    assert problems == [] and kinds


def test_the_kind_is_told_from_the_document():
    kinds: dict[str, set] = {}
    for path in SHIPPED:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        kinds.setdefault(path.relative_to(ROOT).parts[0], set()).update(map(document_kind, documents))
    assert kinds["cluster"] == {"ray-up"}
    assert kinds["k8s"] == {"kuberay", "kubernetes"}
    assert kinds["configs"] == {"kvserve", "serve"}


def broken_copy(tmp_path, source: str, edit) -> Path:
    document = yaml.safe_load((ROOT / source).read_text())
    edit(document)
    path = tmp_path / Path(source).name
    path.write_text(yaml.safe_dump(document))
    return path


def serve_args(document):
    return document["applications"][0]["args"]


BROKEN = [
    ("configs/cpu-default.yaml", lambda d: d["engine"].update(blok_size=16), "engine.blok_size: unknown key"),
    ("configs/serve-llama-70b-tp8.yaml", lambda d: serve_args(d)["engine"].update(tp_size=0),
     "applications[0].args.engine.tp_size: Input should be greater than or equal to 1"),
    ("configs/serve-cpu.yaml", lambda d: d["applications"][0].pop("import_path"), "applications[0].import_path"),
    ("cluster/launch/local.yaml", lambda d: d["provider"].update(worker_ips="10.0.0.2"), "provider.worker_ips"),
    ("k8s/rayservice.yaml", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update(
        foo="1"), "spec.rayClusterConfig.headGroupSpec.rayStartParams.foo: unknown key"),
    ("k8s/raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),
     "spec.workerGroupSpecs[0].replicas: must be of type integer"),
]


@pytest.mark.parametrize("source, edit, problem", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_copy_is_refused_with_its_path(tmp_path, source, edit, problem):
    _, problems = validate_file(broken_copy(tmp_path, source, edit))
    assert any(p.startswith(problem) for p in problems), problems


def test_the_command_prints_each_problem_and_exits_1(tmp_path):
    source, edit, problem = BROKEN[1]
    path = broken_copy(tmp_path, source, edit)
    result = subprocess.run([sys.executable, "-m", "kvserve.cluster.cli", "validate", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"{path}: {problem}" in result.stderr and "Traceback" not in result.stderr
    ok = subprocess.run([sys.executable, "-m", "kvserve.cluster.cli", "validate", str(ROOT / "k8s/rayservice.yaml")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "valid (kuberay)" in ok.stdout
