"""The Responses API's store, as a plain object (the served path runs it as an actor: test_serving)."""

from kvserve.router.response_store import ResponseStore


def test_the_store_keeps_the_latest_and_forgets_the_oldest():
    store = ResponseStore(capacity=3)
    for k in range(4):
        store.put({"id": f"resp_{k}", "output": []}, [{"role": "user", "content": str(k)}])
    assert store.response("resp_0") is None and store.conversation("resp_0") is None
    assert store.conversation("resp_3") == [{"role": "user", "content": "3"}]
    store.put({"id": "resp_1", "output": ["again"]}, [])  # stored again: now the newest
    store.put({"id": "resp_4", "output": []}, [])
    assert store.response("resp_2") is None and store.response("resp_1")["output"] == ["again"]
    assert store.delete("resp_1") and not store.delete("resp_1") and store.response("resp_1") is None
