"""Deploying the application and waiting for it, within a time limit: a deployment that
cannot be placed or started ends in one line that says why, not in a wait without end or a
long Serve traceback."""

import time

import ray
from ray import serve
from ray.serve.schema import ApplicationStatus

from kvserve.cluster.config import AppConfig
from kvserve.cluster.preflight import cluster_node_types, replica_bundles

POLL_S = 1.0


class DeployError(ValueError):
    """The application did not come up as configured; the message is one line."""


def deploy(app, config: AppConfig) -> None:
    """Deploy `app` and return once it runs; DeployError when it failed or ran out of time."""
    name = config.serving.app_name
    serve._run(app, name=name, route_prefix="/", _blocking=False)
    deadline = time.monotonic() + config.serving.deploy_timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise DeployError(_failure(status))
        time.sleep(POLL_S)
    raise DeployError(_timed_out(config))


def _failure(status) -> str:
    """The last line of the failing deployment's own error (the replica's exception)."""
    messages = [d.message for d in status.deployments.values() if d.message] or [status.message]
    lines = [line.strip() for message in messages for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "the application failed to deploy"


def _timed_out(config: AppConfig) -> str:
    serving = config.serving
    bundles = replica_bundles(config, cluster_node_types())
    available = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    return (f"the application was not running after {serving.deploy_timeout_s:g} s (serving.deploy_timeout_s): "
            f"{serving.replicas} LLMServer replica(s) asking for {bundles} each; the cluster has "
            f"{total} in all, {available} free")
