"""Deploying the application and waiting for it, within a time limit: a deployment that
cannot be placed or started ends in one line that says why, not in a wait without end or a
long Serve traceback."""

import time

import ray
from ray import serve
from ray.serve.schema import ApplicationStatus

from kvserve.cluster.config import AppConfig, ClusterConfig
from kvserve.cluster.preflight import cluster_node_types, replica_bundles

POLL_S = 1.0


class DeployError(ValueError):
    """The application did not come up as configured; the message is one line."""


def deploy(app, config: AppConfig) -> None:
    """Deploy `app` and return once it runs; DeployError when it failed or ran out of time."""
    serve._run(app, name=config.serving.app_name, route_prefix="/", _blocking=False)
    _wait_until_running([config.serving.app_name], config.serving.deploy_timeout_s, [config])


def deploy_cluster(apps: dict, cluster: ClusterConfig) -> None:
    """Deploy the applications of several models (name -> application, the ingress's named
    `serving.app_name`) and return once all run; DeployError as `deploy`."""
    ingress = cluster.serving.app_name
    for name, app in apps.items():
        # Only the ingress answers HTTP; the models' applications are reached through handles.
        serve._run(app, name=name, route_prefix="/" if name == ingress else None, _blocking=False)
    _wait_until_running(list(apps), cluster.serving.deploy_timeout_s, cluster.models)


def _wait_until_running(names: list[str], timeout_s: float, configs: list[AppConfig]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = serve.status().applications
        failed = [statuses[n] for n in names if n in statuses and statuses[n].status == ApplicationStatus.DEPLOY_FAILED]
        if failed:
            raise DeployError(_failure(failed[0]))
        if all(n in statuses and statuses[n].status == ApplicationStatus.RUNNING for n in names):
            return
        time.sleep(POLL_S)
    raise DeployError(_timed_out(configs, timeout_s))


def _failure(status) -> str:
    """The last line of the failing deployment's own error (the replica's exception)."""
    messages = [d.message for d in status.deployments.values() if d.message] or [status.message]
    lines = [line.strip() for message in messages for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "the application failed to deploy"


def _timed_out(configs: list[AppConfig], timeout_s: float) -> str:
    node_types = cluster_node_types()
    asked = "; ".join(
        f"{config.serving.replicas} LLMServer replica(s) asking for {replica_bundles(config, node_types)} each"
        + (f" ({config.served_model_name()})" if len(configs) > 1 else "")
        for config in configs
    )
    available = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    return (f"the application was not running after {timeout_s:g} s (serving.deploy_timeout_s): "
            f"{asked}; the cluster has {total} in all, {available} free")
