"""`ResponseStore`: the responses of the Responses API kept for later (`store`, the default),
one named actor per ingress application, so that whichever ingress replica gets the next
request can continue a conversation from `previous_response_id` or return a response by id.

A response is kept with its conversation: the input items of every request in its chain and
the output items of each response, as the next request's input would list them. The store
holds the latest `MAX_STORED_RESPONSES`; older ones are forgotten (a request naming one gets a
404, as for an id never stored). It lives in memory: a cluster restart forgets them all.
"""

from collections import OrderedDict

import ray
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

STORE_NAME_PREFIX = "kvserve-responses"
MAX_STORED_RESPONSES = 4096


class ResponseStore:
    """Response id -> (the response object, its conversation's items)."""

    def __init__(self, capacity: int = MAX_STORED_RESPONSES):
        self.capacity = capacity
        self._responses: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, conversation: list[dict]) -> None:
        self._responses[response["id"]] = (response, conversation)
        self._responses.move_to_end(response["id"])
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def response(self, response_id: str) -> dict | None:
        kept = self._responses.get(response_id)
        return kept[0] if kept else None

    def conversation(self, response_id: str) -> list[dict] | None:
        kept = self._responses.get(response_id)
        return kept[1] if kept else None

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None


async def get_or_create_store(app_name: str):
    """The store of Serve application `app_name`, started as `workers/app_actors.py` starts the
    workers' (which the router may not import): named, detached, outside any placement group,
    killed by Serve at shutdown."""
    store = (
        ray.remote(ResponseStore)
        .options(name=f"{STORE_NAME_PREFIX}-{app_name}", namespace="kvserve", get_if_exists=True,
                 lifetime="detached", num_cpus=0, scheduling_strategy="DEFAULT")
        .remote()
    )
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    await controller._register_shutdown_cleanup_actor.remote(store)
    return store
