"""Security and lifecycle on a real local Ray: the API key, a readiness that matches what the
service can do, `kvserve serve` stopped by SIGINT even when it inherited SIGINT ignored, and a
local Ray whose ports are all on loopback."""

import ipaddress
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import httpx
import pytest
import ray
import psutil  # after ray: Ray ships psutil in its thirdparty_files, added to sys.path on import
from ray import serve

from kvserve.cluster.app import build_app
from kvserve.cluster.cli import build_parser, config_overrides
from kvserve.cluster.config import load_config
from kvserve.workers.models.distributed import free_port

APP = "sectest"
KEY = "sk-test-4f9a"
ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 128}
COMPLETION = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_from_flag_then_config_then_environment(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_API_KEY", "from-env")
    config = tmp_path / "app.yaml"
    config.write_text(f"engine:\n  model: {tiny_checkpoints['llama']}\n")
    assert load_config(config).serving.api_key == "from-env"
    config.write_text(f"engine:\n  model: {tiny_checkpoints['llama']}\nserving:\n  api_key: from-config\n")
    assert load_config(config).serving.api_key == "from-config"
    args = build_parser().parse_args(["serve", "--config", str(config), "--api-key", "from-flag"])
    assert load_config(config, config_overrides(args)).serving.api_key == "from-flag"
    assert not load_config(config).serving.metrics_need_api_key


class TestIngress:
    """One application with a key and a key-protected /metrics, deployed while a placeholder
    actor holds every CPU, so that the ingress is up long before any LLMServer replica."""

    @pytest.fixture(scope="class")
    def server(self, tiny_checkpoints, ray_of, ready_probe):
        port = free_port()
        config = load_config(None, {
            "engine": {**ENGINE, "model": str(tiny_checkpoints["llama"])},
            "serving": {"app_name": APP, "replicas": 1, "replica_cpus": 1, "port": port, "api_key": KEY,
                        "metrics_need_api_key": True},
        })
        with ray_of(2):
            placeholder = _CPUHolder.remote()
            ray.get(placeholder.ready.remote())
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve._run(build_app(config), name=APP, route_prefix="/", _blocking=False)
            base = f"http://127.0.0.1:{port}"
            _wait_for_the_ingress(base, ready_probe)
            yield base, placeholder

    def test_ready_is_503_while_no_llm_replica_runs(self, server):
        base, _ = server
        for _ in range(3):
            reply = httpx.get(f"{base}/ready")
            assert reply.status_code == 503 and reply.json()["ready"] is False and reply.json()["running_replicas"] == 0
            time.sleep(1)

    def test_ready_is_200_as_soon_as_a_completion_succeeds(self, server):
        base, placeholder = server
        ray.kill(placeholder)  # frees the CPUs: the LLMServer replica starts
        reply = httpx.post(f"{base}/v1/completions", json=COMPLETION, headers=_bearer(KEY), timeout=180)
        assert reply.status_code == 200, reply.text
        assert httpx.get(f"{base}/ready").status_code == 200

    @pytest.mark.parametrize("method,route,body", [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", COMPLETION),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [5, 6]}),
        ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 2}),
        ("POST", "/score", {"text_1": "hi", "text_2": "ho"}),
        ("POST", "/rerank", {"query": "hi", "documents": ["ho"]}),
        ("POST", "/v2/rerank", {"query": "hi", "documents": ["ho"]}),
        ("POST", "/v1/messages/count_tokens", {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
    ])
    def test_v1_and_tokenizer_routes_need_the_key(self, server, method, route, body):
        base, _ = server
        for headers in ({}, _bearer("sk-wrong"), {"Authorization": KEY}, _bearer(KEY + "x")):
            reply = httpx.request(method, f"{base}{route}", json=body, headers=headers, timeout=60)
            assert reply.status_code == 401, (headers, reply.text)
            error = reply.json()["error"]
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        reply = httpx.request(method, f"{base}{route}", json=body, headers=_bearer(KEY), timeout=60)
        assert reply.status_code == 200, reply.text

    def test_anthropic_clients_send_the_key_as_x_api_key(self, server):
        base, _ = server
        body = {"model": "llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        for headers, status in (({"x-api-key": KEY}, 200), ({"x-api-key": "sk-wrong"}, 401), ({}, 401)):
            reply = httpx.post(f"{base}/v1/messages", json=body, headers=headers, timeout=60)
            assert reply.status_code == status, (headers, reply.text)

    def test_the_key_is_checked_before_the_body(self, server):
        base, _ = server
        reply = httpx.post(f"{base}/v1/completions", content=b"{not json", timeout=60,
                           headers={"content-type": "application/json"})
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"

    def test_health_ready_and_version_stay_open_and_metrics_can_need_the_key(self, server):
        base, _ = server
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/version").json() == {"version": version("kvserve")}
        assert httpx.get(f"{base}/ready").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert httpx.get(f"{base}/metrics", headers=_bearer(KEY)).status_code == 200


@ray.remote(num_cpus=2)
class _CPUHolder:
    def ready(self) -> bool:
        return True


def _wait_for_the_ingress(base: str, ready_reply) -> None:
    """Until /ready is answered by the ingress itself (JSON), not by the proxy (text)."""
    deadline = time.monotonic() + 180
    while True:
        reply = ready_reply(base)
        if reply is not None and reply.headers.get("content-type") == "application/json":
            return
        answer = "no answer" if reply is None else f"{reply.status_code} {reply.text!r}"
        assert time.monotonic() < deadline, f"the ingress never came up: {answer}; {serve.status()}"
        time.sleep(0.5)


class TestLocalCli:
    """`kvserve serve` without --address, started as a background job of a non-interactive shell
    starts it: with SIGINT ignored."""

    @pytest.fixture(scope="class")
    def cli(self, tiny_checkpoints, tmp_path_factory):
        port = free_port()
        command = [sys.executable, "-m", "kvserve.cluster.cli", "serve", "--model", str(tiny_checkpoints["llama"]),
                   "--device", "cpu", "--port", str(port)]
        home = tmp_path_factory.mktemp("home")
        env = {**os.environ, "KVSERVE_HOME": str(home)}
        env.pop("RAY_ADDRESS", None)
        with open(home / "serve.log", "w") as log:  # a file: a pipe nobody reads can fill and block it
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=_ignore_sigint)
        process.log = home / "serve.log"
        try:
            _wait_until_ready(process, port)
            yield process, _tree(process.pid)
        finally:
            _kill_what_is_left(process)

    def test_local_ray_listens_on_loopback_only(self, cli):
        _, tree = cli
        exposed = [(name, ip, port) for name, ip, port in _listening(tree)
                   if not _is_loopback(ip) and not _replica_grpc_server(name, ip)]
        assert exposed == []

    def test_sigint_stops_it_cleanly_even_when_inherited_ignored(self, cli):
        process, tree = cli
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0, process.log.read_text()
        assert "kvserve: shutting down" in process.log.read_text()
        deadline = time.monotonic() + 30
        while _alive(tree):
            assert time.monotonic() < deadline, f"left running: {[p.name() for p in _alive(tree)]}"
            time.sleep(0.5)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _wait_until_ready(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 180
    while not _ready(port):
        assert process.poll() is None, process.log.read_text()
        assert time.monotonic() < deadline, "never ready"
        time.sleep(1)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _listening(tree: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `tree`."""
    sockets = []
    for process in tree:
        try:
            name, connections = process.name(), process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        sockets += [(name, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    return sockets


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _replica_grpc_server(name: str, ip: str) -> bool:
    """Ray 2.60 starts every Serve replica's inter-deployment gRPC server on "[::]:0", a
    hard-coded address (ray/serve/_private/replica.py, `_on_initialized`); see docs/security.md."""
    return name.startswith("ray::ServeReplica") and ip == "::"


def _alive(tree: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in tree:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill_what_is_left(process: subprocess.Popen) -> None:
    if process.poll() is None:
        for child in _tree(process.pid):
            child.kill()
        process.wait(timeout=30)
