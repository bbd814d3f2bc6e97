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

from kvserve.workers.app_actors import app_actor

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
    """The registry of the model served by Serve application `app_name` (`app_actor`),
    following its `lora_modules` (`startup`)."""
    registry, registered = app_actor(LoRARegistry, f"{REGISTRY_NAME_PREFIX}-{app_name}")
    ray.get([registered, registry.follow_startup.remote(startup)])
    return registry
