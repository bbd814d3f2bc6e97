"""`ray up` for real: cluster/launch/local.yaml brings up a one-node cluster on this machine,
`ray exec` starts `kvserve serve --address auto` on it, a completion comes back over HTTP, and
`ray down` ends it.

The node is this machine reached over SSH as a user of the test's own (`kvray`), through an
sshd of its own on a free port, with a key made here. Ray runs as that user, with its own temp
dir and ports, so the `ray stop` inside `ray up` and `ray down` cannot end anybody else's Ray
(Unix lets it signal only its own processes). Needs root (to add the user and run sshd),
sshd, rsync and nc; `make test` runs it on its own, after the rest of the suite, with
KVSERVE_RAY_UP_TEST=1."""

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.workers.models.distributed import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("KVSERVE_RAY_UP_TEST") != "1",
                       reason="set KVSERVE_RAY_UP_TEST=1 to run it (make test does, on its own)"),
]

USER = "kvray"
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.prefix) / "bin"
CLUSTER = "kvserve-ray-up-test"
TOOLS = ("sshd", "ssh", "ssh-keygen", "rsync", "nc")


def run(*cmd, **kwargs) -> str:
    """Runs a command, failing with its output when it fails; returns its stdout."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def as_user(*cmd) -> str:
    return run("runuser", "-u", USER, "--", *cmd)


def user_processes() -> dict[int, str]:
    """pid -> name of each of the user's processes."""
    out = subprocess.run(["ps", "-u", USER, "-o", "pid=,comm="], capture_output=True, text=True).stdout
    return {int(pid): name.strip() for pid, name in (line.split(None, 1) for line in out.splitlines())}


def end_user_processes() -> None:
    """Kills what the user still runs, by pid, and waits until it is gone."""
    for pid in user_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while user_processes() and time.monotonic() < deadline:
        time.sleep(0.2)


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.2)


def make_user(home: Path) -> None:
    """A fresh `kvray` whose shells keep temp files, Ray's included, under its home."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam(USER)  # left by a run that could not clean up
        end_user_processes()
        run("userdel", "--remove", USER)
    shutil.rmtree(home, ignore_errors=True)
    run("useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash", "--password", "*", USER)
    as_user("mkdir", "-p", f"{home}/tmp", f"{home}/.ssh")
    with open(home / ".bashrc", "a") as bashrc:
        bashrc.write('export TMPDIR="$HOME/tmp"\n')


def make_venv(home: Path) -> None:
    """What an earlier `make install` would leave in ~/kvserve-venv: this venv's packages, seen
    through a venv of the user's own (this interpreter may sit where the user cannot reach),
    so that the YAML's `make install` finds it up to date instead of downloading torch."""
    venv = home / "kvserve-venv"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = next((p for p in (f"{sys.base_prefix}/bin/{version}", f"/usr/bin/{version}")
                   if subprocess.run(["runuser", "-u", USER, "--", p, "-c", ""],
                                     capture_output=True).returncode == 0), None)
    assert python, f"no {version} that {USER} may run"
    as_user(python, "-m", "venv", "--without-pip", str(venv))
    site = venv / "lib" / version / "site-packages"
    (site / "kvserve-test.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    for script in ("ray", "kvserve"):
        _, body = (BIN / script).read_text().split("\n", 1)
        (venv / "bin" / script).write_text(f"#!{venv}/bin/python\n{body}")
        (venv / "bin" / script).chmod(0o755)
    (venv / ".installed").touch()
    run("chown", "-R", f"{USER}:{USER}", str(venv))


def start_sshd(work: Path, home: Path, port: int) -> subprocess.Popen:
    """An sshd for 127.0.0.1:port that lets in only `kvray`, with the key at work/id_ed25519."""
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "id_ed25519"))
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host_key"))
    shutil.copy(work / "id_ed25519.pub", home / ".ssh" / "authorized_keys")
    run("chown", "-R", f"{USER}:{USER}", str(home / ".ssh"))
    (work / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work}/host_key\nPidFile {work}/sshd.pid\n"
        f"AllowUsers {USER}\nAuthenticationMethods publickey\nUsePAM no\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    with open(work / "sshd.log", "w") as log:
        return subprocess.Popen([shutil.which("sshd"), "-D", "-e", "-f", str(work / "sshd_config")], stderr=log)


def cluster_yaml(work: Path, ssh_port: int, ray_ports: dict) -> Path:
    """local.yaml, pointed at this machine's sshd as `kvray`, with the test's token and ports."""
    config = yaml.safe_load((REPO / "cluster" / "launch" / "local.yaml").read_text())
    config["cluster_name"] = CLUSTER
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(work / "id_ed25519"),
                      "ssh_proxy_command": f"nc 127.0.0.1 {ssh_port}"}
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    config["file_mounts"]["~/.ray/auth_token"] = str(token)
    # click keeps the last value of an option given twice: these replace the YAML's ports, and
    # workers take ports the OS picks.
    start = config["head_start_ray_commands"]
    head = next(i for i, cmd in enumerate(start) if "ray start --head" in cmd)
    start[head] += "".join(f" --{name}={port}" for name, port in ray_ports.items())
    start[head] += " --min-worker-port=0 --max-worker-port=0"
    path = work / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def node():
    """This machine as a fresh node: the user, its venv, its sshd; all removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the ray-up test needs root: it adds a user and runs sshd")
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    assert not missing, f"missing {missing}: install openssh-server rsync netcat-openbsd (.ci/run does)"
    work = Path(tempfile.mkdtemp(prefix="kvserve-ray-up-"))
    work.chmod(0o755)  # the user reads the model from here
    home = Path("/home") / USER
    ssh_port = free_port()
    with contextlib.ExitStack() as undo:
        undo.callback(shutil.rmtree, work, ignore_errors=True)
        make_user(home)
        undo.callback(run, "userdel", "--remove", USER)
        make_venv(home)
        sshd = start_sshd(work, home, ssh_port)
        undo.callback(sshd.wait, 10)
        undo.callback(sshd.terminate)
        wait_for_port(ssh_port, 10)
        yield work, ssh_port
        # Normally only sshd's sessions for the connections Ray's ssh keeps open a while;
        # everything the user runs, if `ray down` failed.
        end_user_processes()


def client_env(work: Path) -> dict:
    """The `ray` client keeps its files (cluster state, config cache) in work/, not in /tmp."""
    return {**os.environ, "RAY_TMPDIR": str(work), "TMPDIR": str(work), "RAY_USAGE_STATS_ENABLED": "0"}


def ray_cli(*args, work: Path, timeout: float) -> str:
    return run(BIN / "ray", *args, env=client_env(work), cwd=REPO, timeout=timeout)


def test_ray_up_serves_a_completion_and_ray_down_ends_it(node):
    work, ssh_port = node
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "object-manager-port",
                                            "node-manager-port")}
    config = cluster_yaml(work, ssh_port, ports)
    model = build_tiny_checkpoint(work / "tiny-llama", "llama")
    run("chmod", "-R", "a+rX", str(model))
    http_port = free_port()
    serve_log = work / "serve.log"
    started = time.monotonic()
    try:
        ray_cli("up", "-y", str(config), work=work, timeout=300)
        up_s = time.monotonic() - started

        # Token auth is on, with the token the YAML handed over.
        dashboard = f"http://127.0.0.1:{ports['dashboard-port']}/api/version"
        assert httpx.get(dashboard).status_code == 401
        token = (work / "auth_token").read_text()
        assert httpx.get(dashboard, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        # The node's shells carry RAY_AUTH_MODE=token, as a worker's `ray start` needs: `ray status`
        # works there, and without that variable the cluster refuses it though the token is there.
        ray_cli("exec", str(config), "ray status", work=work, timeout=60)
        refused = subprocess.run([BIN / "ray", "exec", str(config), "env -u RAY_AUTH_MODE ray status"],
                                 env=client_env(work), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stdout + refused.stderr

        with open(serve_log, "w") as log:
            serve = subprocess.Popen(
                [BIN / "ray", "exec", str(config),
                 f"kvserve serve --address auto --config ~/kvserve/configs/cpu-default.yaml "
                 f"--model {model} --replicas 1 --port {http_port}"],
                cwd=REPO, env=client_env(work), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{http_port}"
            deadline = time.monotonic() + 180
            while not _ready(base):
                assert serve.poll() is None, f"kvserve serve ended:\n{serve_log.read_text()}"
                assert time.monotonic() < deadline, f"never ready:\n{serve_log.read_text()}"
                time.sleep(1)
            name = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
            reply = httpx.post(f"{base}/v1/completions", timeout=60, json={
                "model": name, "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 8
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(serve.pid, signal.SIGTERM)  # ssh -tt: its end hangs up `kvserve serve`
            serve.wait(30)
    finally:
        down_started = time.monotonic()
        ray_cli("down", "-y", str(config), work=work, timeout=120)
    deadline = time.monotonic() + 30
    while left := [name for name in user_processes().values() if name != "sshd"]:
        assert time.monotonic() < deadline, f"ray down left {USER}'s {left}"
        time.sleep(1)
    print(f"ray up {up_s:.0f} s, auth checks, serve and completion {down_started - started - up_s:.0f} s, "
          f"ray down {time.monotonic() - down_started:.0f} s")


def _ready(base: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{base}/ready", timeout=5).status_code == 200
    return False
