"""The Serve config files of configs/: each passes Serve's schema and kvserve's config model.
Then (slow) configs/serve-cpu.yaml on a real Ray: `serve deploy` sends it to the dashboard's REST
API of a local head (what KubeRay calls) with token authentication on; it answers over HTTP, then
takes an in-place update (LLMServer 1 -> 2 replicas, a router option) while a client streams.
Last, configs/two-models.serve.yaml: a model added and removed by `serve deploy` while a client
streams to the other, whose replica stays.

The head runs in a temp dir with its own ports and HOME, in a session of its own: it is stopped
by signalling that session's processes, never with `ray stop`, which would end every Ray on the
machine."""

import contextlib
import copy
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from kvserve.cluster.config import parse_config
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM
from kvserve.workers.models.distributed import free_port

CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve-cpu.yaml"
SERVE_CONFIGS = sorted(CPU_CONFIG.parent.glob("serve-*.yaml"))
BIN = Path(sys.executable).parent
APP = "kvserve"
PROMPTS = ("The quick brown fox", "Once upon a time", "Hello there")  # each under one KV block
MAX_TOKENS = 12
MAX_ATTEMPTS = 5
RAY_DEFAULT_WORKER_PORTS = range(10002, 20000)  # other Rays on this machine use these
HEAD_PORT_FLAGS = (
    "--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
    "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port", "--metrics-export-port",
)
WORKER_PORTS = 48


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free now, none in Ray's default worker range."""
    ports = set()
    while len(ports) < count:
        if (port := free_port()) not in RAY_DEFAULT_WORKER_PORTS:
            ports.add(port)
    return list(ports)


def isolated_env(home: Path) -> dict:
    """The environment of the head and of the CLIs: their own HOME (where Ray keeps the token,
    ~/.ray/auth_token), token authentication on, and nothing pointing at another Ray."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    # No drain on SIGTERM: the head stops its processes at once.
    return {**env, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def session_pids(sid: int) -> list[int]:
    """The processes of session `sid`; Ray's workers have process groups of their own in it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
    return pids


@dataclass
class RayHead:
    process: subprocess.Popen
    root: Path
    env: dict
    token: str
    dashboard: str
    http_port: int  # for Serve's proxy, picked with the head's ports so that none collide

    def log_tail(self) -> str:
        return (self.root / "head.log").read_text(errors="replace")[-3000:]

    def serve(self, *args: str) -> str:
        """Serve's CLI against this head's dashboard."""
        command = [str(BIN / "serve"), *args, "--address", self.dashboard]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"serve {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def rest(self, path: str, headers: dict | None = None) -> httpx.Response:
        """GET from the dashboard's REST API, by default with this head's token."""
        headers = {"Authorization": f"Bearer {self.token}"} if headers is None else headers
        return httpx.get(f"{self.dashboard}{path}", headers=headers, timeout=10)

    def applications(self) -> dict | None:
        with contextlib.suppress(httpx.TransportError):
            response = self.rest("/api/serve/applications/")
            if response.status_code == 200:
                return response.json()["applications"]
        return None

    def wait_until(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process.poll() is None, f"the Ray head exited while waiting for {what}:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout_s} s; head log:\n{self.log_tail()}"
            time.sleep(1)


def launch_head() -> RayHead:
    root = Path(tempfile.mkdtemp(prefix="kvs-"))  # short: Ray's socket paths live under it
    home = root / "home"
    home.mkdir()
    env = isolated_env(home)
    generate = [str(BIN / "ray"), "get-auth-token", "--generate"]
    token = subprocess.run(generate, env=env, capture_output=True, text=True, check=True).stdout.strip()
    http_port, *ports = free_ports(1 + len(HEAD_PORT_FLAGS) + WORKER_PORTS)
    head_ports, worker_ports = ports[:len(HEAD_PORT_FLAGS)], ports[len(HEAD_PORT_FLAGS):]
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "4", "--temp-dir", str(root / "ray"),
        "--node-ip-address", "127.0.0.1", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--object-store-memory", str(200 << 20), "--disable-usage-stats",
        *(str(x) for pair in zip(HEAD_PORT_FLAGS, head_ports) for x in pair),
        "--worker-port-list", ",".join(map(str, worker_ports)),
    ]
    with (root / "head.log").open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return RayHead(process, root, env, token, f"http://127.0.0.1:{head_ports[1]}", http_port)


def stop_head(head: RayHead) -> None:
    """Serve shutdown through the CLI, then the head's session: SIGTERM to `ray start`, which
    stops what it started, and SIGKILL to anything of the session still alive."""
    try:
        if head.process.poll() is None and head.applications():
            head.serve("shutdown", "-y")
            with contextlib.suppress(AssertionError):
                head.wait_until(lambda: head.applications() == {}, 60, "applications deleted")
    finally:
        sid = head.process.pid
        head.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.process.wait(timeout=60)
        head.process.kill()
        head.process.wait()
        deadline = time.monotonic() + 10
        while (pids := session_pids(sid)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(head.root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    head = launch_head()
    try:
        head.wait_until(lambda: head.applications() is not None, 120, "dashboard answering with the token")
        yield head
    finally:
        stop_head(head)


@pytest.fixture(scope="module")
def serve_config(tiny_checkpoints, ray_head) -> dict:
    """configs/serve-cpu.yaml pointed at the tiny checkpoint, on a free port, with a small KV pool."""
    config = yaml.safe_load(CPU_CONFIG.read_text())
    config["http_options"]["port"] = ray_head.http_port
    engine = app_args(config)["engine"]
    engine.pop("kv_cache_memory_gib", None)
    engine.update(model=str(tiny_checkpoints["llama"]), num_kv_blocks=64, max_model_len=256)
    return config


def app_args(config: dict) -> dict:
    (app,) = config["applications"]
    return app["args"]


def deployment(config: dict, name: str) -> dict:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)


def base_url(config: dict) -> str:
    return f"http://127.0.0.1:{config['http_options']['port']}"


def model_name(config: dict) -> str:
    return Path(app_args(config)["engine"]["model"]).name


@pytest.fixture(scope="module")
def expected(serve_config) -> dict[str, str]:
    """Each prompt's greedy completion from the offline engine with the deployed engine settings."""
    engine = {k: v for k, v in app_args(serve_config)["engine"].items() if k != "cpu_threads"}
    llm = LLM(**engine)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        return {prompt: llm.generate(prompt, params)[0].outputs[0].text for prompt in PROMPTS}
    finally:
        llm.engine.shutdown()


def deploy(head: RayHead, config: dict, name: str) -> None:
    path = head.root / name
    path.write_text(yaml.safe_dump(config))
    head.serve("deploy", str(path))


def running_with(head: RayHead, llm_replicas: int) -> bool:
    """`serve status` says the application runs with `llm_replicas` LLMServer replicas."""
    app = (yaml.safe_load(head.serve("status")).get("applications") or {}).get(APP)
    if app is None:
        return False
    assert app["status"] != "DEPLOY_FAILED", app["message"]
    llm = app["deployments"].get("LLMServer", {})
    return app["status"] == "RUNNING" and llm.get("replica_states") == {"RUNNING": llm_replicas}


@pytest.fixture(scope="module")
def deployed(ray_head, serve_config) -> dict:
    deploy(ray_head, serve_config, "serve-cpu.yaml")
    ray_head.wait_until(lambda: running_with(ray_head, 1), 240, "RUNNING application")
    return serve_config


class Refused(Exception):
    """A clean refusal the client retries: a 503, or a connection that failed or dropped."""


class WrongAnswer(Exception):
    """Anything else: an error status or chunk, or a text other than the expected one."""


def complete(config: dict, prompt: str) -> dict:
    body = {"model": model_name(config), "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{base_url(config)}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stream_completion(config: dict, prompt: str) -> str:
    body = {"model": model_name(config), "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}
    pieces = []
    try:
        with httpx.stream("POST", f"{base_url(config)}/v1/completions", json=body, timeout=60) as response:
            if response.status_code != 200:
                text = response.read().decode(errors="replace")
                raise (Refused if response.status_code == 503 else WrongAnswer)(f"{response.status_code}: {text}")
            for line in response.iter_lines():
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return "".join(pieces)
                if data:
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise WrongAnswer(f"error chunk: {chunk['error']}")
                    pieces.append(chunk["choices"][0]["text"])
    except httpx.TransportError as error:
        raise Refused(repr(error)) from error
    raise Refused("the stream ended without [DONE]")


@dataclass
class StreamingClient:
    """Streams the prompts one after another until stopped, retrying clean refusals."""

    config: dict
    expected: dict[str, str]
    completed: int = 0
    retries: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        for prompt in itertools.cycle(PROMPTS):
            if self.stop.is_set():
                return
            try:
                self.request(prompt)
            except Exception as error:
                self.failures.append(f"{prompt!r}: {error!r}")

    def request(self, prompt: str) -> None:
        for _ in range(MAX_ATTEMPTS):
            try:
                text = stream_completion(self.config, prompt)
            except Refused as refusal:
                self.retries.append(str(refusal))
                time.sleep(0.5)
                continue
            if text != self.expected[prompt]:
                raise WrongAnswer(f"got {text!r}, expected {self.expected[prompt]!r}")
            self.completed += 1
            return
        raise WrongAnswer(f"refused {MAX_ATTEMPTS} times in a row")


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda path: path.name)
def test_serve_config_is_valid(path):
    """Serve's schema accepts the file, and each application's args are a kvserve config."""
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for app in config.applications:
        assert app.import_path == "kvserve.cluster.app:app_builder"
        parse_config(app.args)
        assert {d.name for d in app.deployments} <= {"LLMServer", "Ingress"}


@pytest.mark.slow
def test_dashboard_api_refuses_requests_without_the_token(ray_head):
    path = "/api/serve/applications/"
    assert ray_head.rest(path, headers={}).status_code == 401
    assert ray_head.rest(path, headers={"Authorization": "Bearer not-the-token"}).status_code == 403


@pytest.mark.slow
def test_deployed_config_answers_like_the_offline_engine(deployed, expected):
    for prompt in PROMPTS:
        body = complete(deployed, prompt)
        assert body["choices"][0]["text"] == expected[prompt]
        assert body["usage"]["completion_tokens"] == MAX_TOKENS


@pytest.mark.slow
def test_update_in_place_while_a_client_streams(ray_head, deployed, expected):
    changed = copy.deepcopy(deployed)
    deployment(changed, "LLMServer")["num_replicas"] = 2
    app_args(changed)["serving"]["router_options"]["cost_unit"] = "tokens"
    client = StreamingClient(deployed, expected)
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    try:
        deploy(ray_head, changed, "serve-cpu-2.yaml")
        ray_head.wait_until(lambda: running_with(ray_head, 2), 300, "RUNNING application with 2 LLMServer replicas")
        after_update = client.completed
        ray_head.wait_until(lambda: client.completed >= after_update + len(PROMPTS), 60, "requests after the update")
    finally:
        client.stop.set()
        thread.join(timeout=120)
    print(f"\nstreamed {client.completed} completions, {len(client.retries)} retried: {client.retries}")
    assert not client.failures, client.failures
    assert client.completed >= 2 * len(PROMPTS)
    router = ray_head.applications()[APP]["deployments"]["LLMServer"]["deployment_config"]["request_router_config"]
    assert router["request_router_kwargs"]["cost_unit"] == "tokens"


TWO_MODELS_CONFIG = CPU_CONFIG.parent / "two-models.serve.yaml"


def two_models_config(head: RayHead, tiny_checkpoints: dict) -> dict:
    """configs/two-models.serve.yaml on this head's port, its models the tiny llama and qwen2
    checkpoints served under their folders' names (the ingress's `models` are YAML aliases of
    the model applications' args, so one change serves both)."""
    config = yaml.safe_load(TWO_MODELS_CONFIG.read_text())
    config["http_options"]["port"] = head.http_port
    for app, arch in zip(config["applications"], ("llama", "qwen2")):
        app["args"]["engine"].update(model=str(tiny_checkpoints[arch]), num_kv_blocks=64, max_model_len=256)
        app["args"]["engine"].pop("kv_cache_memory_gib")
        app["args"]["serving"]["served_model_name"] = arch
        app["name"] = f"{APP}-{arch}"
    return config


def without_qwen2(config: dict) -> dict:
    changed = copy.deepcopy(config)
    changed["applications"] = [app for app in changed["applications"] if app["name"] != f"{APP}-qwen2"]
    ingress = next(app for app in changed["applications"] if app["name"] == APP)
    ingress["args"]["models"] = [m for m in ingress["args"]["models"] if m["serving"]["served_model_name"] != "qwen2"]
    return changed


def all_running(head: RayHead, names: set[str]) -> bool:
    apps = head.applications() or {}
    failed = [f"{name}: {app['message']}" for name, app in apps.items() if app["status"] == "DEPLOY_FAILED"]
    assert not failed, failed
    return set(apps) == names and all(app["status"] == "RUNNING" for app in apps.values())


def llm_replica_ids(head: RayHead, app: str) -> set[str]:
    return {r["replica_id"] for r in head.applications()[app]["deployments"]["LLMServer"]["replicas"]}


def served_models(config: dict) -> set[str]:
    """The base models /v1/models lists; none while the ingress does not answer."""
    with contextlib.suppress(httpx.TransportError):
        response = httpx.get(f"{base_url(config)}/v1/models", timeout=10)
        if response.status_code == 200:
            return {card["id"] for card in response.json()["data"] if card.get("parent") is None}
    return set()


@pytest.mark.slow
def test_serve_deploy_adds_and_removes_a_model_while_another_streams(ray_head, deployed, expected, tiny_checkpoints):
    """Last in this module: it replaces the module's application by the two-models config's. A
    client streams to the llama model throughout; qwen2 is added, then removed, by `serve
    deploy` of a changed config; llama's replica is never restarted and no request fails."""
    llama_only = without_qwen2(two_models_config(ray_head, tiny_checkpoints))
    both = two_models_config(ray_head, tiny_checkpoints)
    deploy(ray_head, llama_only, "llama-only.yaml")
    ray_head.wait_until(lambda: all_running(ray_head, {APP, f"{APP}-llama"}), 300, "the llama-only cluster RUNNING")
    llama = llm_replica_ids(ray_head, f"{APP}-llama")
    client_view = {"http_options": both["http_options"], "applications": [both["applications"][0]]}
    client = StreamingClient(client_view, expected)
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    try:
        for config, apps, name in ((both, {APP, f"{APP}-llama", f"{APP}-qwen2"}, "both.yaml"),
                                   (llama_only, {APP, f"{APP}-llama"}, "llama-again.yaml")):
            deploy(ray_head, config, name)
            ray_head.wait_until(lambda: all_running(ray_head, apps), 300, f"{name} RUNNING")
            ray_head.wait_until(lambda: served_models(config) == {a.removeprefix(f"{APP}-") for a in apps - {APP}},
                                60, f"/v1/models of {name}")
            served = client.completed
            ray_head.wait_until(lambda: client.completed >= served + len(PROMPTS), 60, f"requests after {name}")
    finally:
        client.stop.set()
        thread.join(timeout=120)
    print(f"\nstreamed {client.completed} completions, {len(client.retries)} retried: {client.retries}")
    assert not client.failures, client.failures
    assert llm_replica_ids(ray_head, f"{APP}-llama") == llama
