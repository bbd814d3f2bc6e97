"""Preflight and deployment failures: what cannot work is refused before deploying with one
line naming the key and the numbers; what fails while deploying ends in time, in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from ray import serve

from kvserve.cluster.app import build_app
from kvserve.cluster.config import load_config
from kvserve.cluster.deploy import DeployError, deploy
from kvserve.cluster.preflight import NodeType, check_model, check_resources, fit_to_cpus
from kvserve.workers.models.distributed import free_port

ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256}


def config_of(model, engine=None, serving=None):
    return load_config(None, {"engine": {**ENGINE, "model": str(model), **(engine or {})}, "serving": serving or {}})


def with_config(source, tmp_path, **changes):
    """A copy of checkpoint `source` whose config.json has `changes`."""
    copy = shutil.copytree(source, tmp_path / "changed")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


def test_checkpoint_problems_name_their_key(tiny_checkpoints, tmp_path):
    llama = tiny_checkpoints["llama"]
    assert check_model(config_of(llama).engine) == []
    odd_mlp = with_config(llama, tmp_path, intermediate_size=1001)
    [problem] = check_model(config_of(odd_mlp, {"tp_size": 2}).engine)
    assert problem.startswith("engine.tp_size: ") and "intermediate_size 1001" in problem
    [problem] = check_model(config_of(llama, {"max_model_len": 4096}).engine)
    assert problem.startswith("engine.max_model_len: ") and "4096" in problem
    [problem] = check_model(config_of(llama, {"num_kv_blocks": 4}).engine)
    assert problem.startswith("engine.num_kv_blocks: ") and "4 blocks" in problem
    [problem] = check_model(config_of(tmp_path / "nowhere").engine)
    assert problem.startswith("engine.model: ")


def test_resources_against_the_nodes(tiny_checkpoints):
    gpu_node = NodeType({"CPU": 8, "GPU": 2}, max_count=2)
    four = config_of(tiny_checkpoints["llama"], serving={"replicas": 4, "replica_gpus": 1})
    assert check_resources(four, [gpu_node]) == []
    [problem] = check_resources(four.model_copy(update={"serving": four.serving.model_copy(
        update={"replicas": 5})}), [gpu_node])
    assert problem.startswith("serving.replicas: 5 replicas") and "room for 4" in problem
    tp8 = config_of(tiny_checkpoints["llama"], {"device": "cuda", "tp_size": 8})
    [problem] = check_resources(tp8, [gpu_node, NodeType({"CPU": 64}, max_count=10)])
    assert problem.startswith("engine.tp_size: one replica needs") and "8 GPU" in problem


def test_a_small_machine_gets_fractional_reservations(tiny_checkpoints):
    tp2 = config_of(tiny_checkpoints["llama"], {"tp_size": 2}, {"replicas": 1})
    fitted = fit_to_cpus(tp2, num_cpus=2)
    reserved = fitted.serving.replica_cpus + 2 * fitted.engine.rank_cpus
    assert 1.9 <= reserved <= 2
    assert check_resources(fitted, [NodeType({"CPU": 2}, max_count=1)]) == []
    assert fit_to_cpus(tp2, num_cpus=16) is tp2


@pytest.fixture(scope="module")
def local_ray(ray_of):
    with ray_of(2):
        yield


def test_a_replica_that_fails_to_start_says_why_in_one_line(local_ray, tiny_checkpoints, tmp_path):
    broken = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "no-weights")
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    config = config_of(broken, serving={"app_name": "broken", "replica_cpus": 0.5, "deploy_timeout_s": 90})
    try:
        with pytest.raises(DeployError) as error:
            deploy(build_app(config), config)
    finally:
        serve.shutdown()
    assert "\n" not in str(error.value) and "safetensors" in str(error.value)


def test_a_replica_that_cannot_be_placed_fails_in_time(local_ray, tiny_checkpoints):
    config = config_of(tiny_checkpoints["llama"], serving={"app_name": "unplaceable", "replica_cpus": 64,
                                                            "deploy_timeout_s": 5})
    started = time.monotonic()
    try:
        with pytest.raises(DeployError, match=r"not running after 5 s .*'CPU': 64"):
            deploy(build_app(config), config)
    finally:
        serve.shutdown()
    assert time.monotonic() - started < 60  # Serve's start included, on a loaded machine


def test_serve_with_tp2_on_cpus_becomes_ready_on_a_small_machine(tiny_checkpoints, tmp_path):
    """`kvserve serve --tp 2 --device cpu` on a local Ray: on a 2-core machine the replica and
    its ranks would reserve 3 CPUs; they get fractions of the 2 and the endpoint comes up."""
    port = free_port()
    env = {**os.environ, "KVSERVE_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "kvserve.cluster.cli", "serve", "--model", str(tiny_checkpoints["llama"]),
               "--device", "cpu", "--tp", "2", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _ready(port):
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "never ready"
            time.sleep(1)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def kvserve(*args: str, home) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvserve.cluster.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "KVSERVE_HOME": str(home)}, timeout=300)


def test_serve_and_validate_refuse_a_model_that_cannot_split(tiny_checkpoints, tmp_path):
    odd_mlp = with_config(tiny_checkpoints["llama"], tmp_path, intermediate_size=1001)
    served = kvserve("serve", "--model", str(odd_mlp), "--device", "cpu", "--tp", "2", home=tmp_path)
    assert served.returncode == 1, served.stderr
    last = served.stderr.strip().splitlines()[-1]
    assert last.startswith("kvserve serve: error: engine.tp_size: ") and "intermediate_size 1001" in last
    config = tmp_path / "odd.yaml"
    config.write_text(f"engine:\n  model: {odd_mlp}\n  device: cpu\n  tp_size: 2\n")
    validated = kvserve("validate", str(config), home=tmp_path)
    assert validated.returncode == 1 and "engine.tp_size: " in validated.stderr
    assert "Traceback" not in served.stderr + validated.stderr
