"""`LoRARegistry`: the LoRA adapters one model serves now, one named actor per model's Serve
application: those of `lora_modules` at first, then as `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter` change them.

Why an actor and not a broadcast to the replicas: Serve has no call that reaches every replica,
replicas come and go (autoscaling, replacement), and there may be several ingress replicas. So
the registry is the one truth: every ingress replica asks it which folder an adapter name
stands for and sends that folder with each request, so whichever replica serves it loads the
adapter then (checked as at startup); replicas poll it to drop the adapters unloaded since,
those of their `lora_modules` included.
"""

import ray
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

REGISTRY_NAME_PREFIX = "kvserve-lora-registry"
POLL_PERIOD_S = 2.0  # how often a replica looks for adapters unloaded since


class LoRARegistry:
    """Adapter name -> PEFT folder. Its methods run one at a time, so two loads of one name
    cannot both succeed."""

    def __init__(self):
        self._folders: dict[str, str] = {}
        self._startup: dict[str, str] = {}  # the `lora_modules` last followed

    def follow_startup(self, startup: dict[str, str]) -> None:
        """Take the deployment's `lora_modules`: the adapters it names anew (a first deployment, or
        a config that changed them) are served, those it no longer names are not; the others
        stay as the endpoints left them, so an adapter unloaded stays unloaded when a replica
        restarts."""
        for name in self._startup.keys() - startup.keys():
            self._folders.pop(name, None)
        for name, folder in startup.items():
            if self._startup.get(name) != folder:
                self._folders[name] = folder
        self._startup = dict(startup)

    def load(self, name: str, folder: str) -> bool:
        """Register `name`; False if it is registered already."""
        if name in self._folders:
            return False
        self._folders[name] = folder
        return True

    def unload(self, name: str) -> bool:
        """Forget `name`; False if it was not registered."""
        return self._folders.pop(name, None) is not None

    def folder(self, name: str) -> str | None:
        return self._folders.get(name)

    def folders(self) -> dict[str, str]:
        return dict(self._folders)


def get_or_create_registry(app_name: str, startup: dict[str, str]):
    """The registry of the model served by Serve application `app_name`, following its
    `lora_modules` (`startup`); Serve kills it on `serve.shutdown()`. Outside any replica's
    placement group, which would take it down with it."""
    registry = (
        ray.remote(LoRARegistry)
        .options(name=f"{REGISTRY_NAME_PREFIX}-{app_name}", namespace="kvserve", get_if_exists=True,
                 lifetime="detached", num_cpus=0, scheduling_strategy="DEFAULT")
        .remote()
    )
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    ray.get([controller._register_shutdown_cleanup_actor.remote(registry), registry.follow_startup.remote(startup)])
    return registry
