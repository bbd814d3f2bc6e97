"""Named actors that belong to a Serve application (one per application, whichever replica asks
first starts it): detached and outside any replica's placement group, which would take them
down with it, and registered with Serve's controller, which kills them on `serve.shutdown()`."""

import ray
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE


def app_actor(cls: type, name: str, **options):
    """The actor of class `cls` named `name` (with more actor `options`), started if need be,
    and the ref of its registration for Serve's shutdown cleanup (wait for it)."""
    actor = (
        ray.remote(cls)
        .options(name=name, namespace="kvserve", get_if_exists=True, lifetime="detached", num_cpus=0,
                 scheduling_strategy="DEFAULT", **options)
        .remote()
    )
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return actor, controller._register_shutdown_cleanup_actor.remote(actor)
