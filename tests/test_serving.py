"""The whole serving path on a real local Ray cluster: the `openai` client against the
ingress, two engine replicas behind the KV-aware router."""

import json
import random
import re
import time

import httpx
import jsonschema
import openai
import pytest
import ray
from ray import serve
from ray.serve import context as serve_context
from request_shapes import WEATHER, Order, random_tokens
from transformers import AutoTokenizer

from kvserve.cluster.bench.routers import routing_decisions
from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.kv_event_hub import hub_name
from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.protocol import GenerateRequest

APP = "kvtest"
ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 160, "max_model_len": 256}


@pytest.fixture(scope="module")
def server(tiny_checkpoints, local_app):
    with local_app({
        "engine": {**ENGINE, "model": str(tiny_checkpoints["llama"])},
        "serving": {"app_name": APP, "replicas": 2, "router": "kv", "replica_cpus": 1,
                    "router_options": {"cost_unit": "tokens", "max_imbalance": 3}},
    }, num_cpus=6) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def offline(tiny_checkpoints):
    return LLM(str(tiny_checkpoints["llama"]), **ENGINE)


def test_completion_equals_the_offline_engine(client, model_name, offline):
    prompts = ["The quick brown fox", "Once upon a time there was"]
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, want in zip(prompts, expected):
        got = client.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want.outputs[0].text
        assert got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 12
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    # Several prompts in one request: each is routed on its own (they once waited forever).
    both = client.completions.create(model=model_name, prompt=prompts, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}, timeout=60)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == [w.outputs[0].text for w in expected]


def test_streamed_completion_equals_the_plain_one(client, model_name):
    args = dict(model=model_name, prompt="Hello there", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    # vLLM's continuous_usage_stats: the usage so far in every chunk.
    counted = list(client.completions.create(**args, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    so_far = [c.usage.completion_tokens for c in counted]
    assert so_far == sorted(so_far) and so_far[-1] == 10 and len(set(so_far)) > 2
    assert {c.usage.prompt_tokens for c in counted} == {plain.usage.prompt_tokens}


def test_chat_plain_and_streamed(client, model_name):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    plain = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert plain.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model_name, messages=messages, max_completion_tokens=8,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == plain.choices[0].message.content
    assert plain.usage.completion_tokens == 8


def test_n_logprobs_stop_and_seed(client, model_name):
    two = client.completions.create(model=model_name, prompt="Numbers:", n=2, max_tokens=8, temperature=1.0,
                                    seed=5, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in two.choices) == [0, 1]
    for choice in two.choices:
        assert len(choice.logprobs.tokens) == 8 and all(1 <= len(t) <= 2 for t in choice.logprobs.top_logprobs)
    again = client.completions.create(model=model_name, prompt="Numbers:", n=2, max_tokens=8, temperature=1.0,
                                      seed=5, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.text for c in two.choices] == [c.text for c in again.choices]
    full = client.completions.create(model=model_name, prompt="Story:", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[4:7]
    cut = client.completions.create(model=model_name, prompt="Story:", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop  # vLLM's: the stop string that ended it
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, logprobs=True, top_logprobs=3, temperature=0)
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)


TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": WEATHER}}]


def test_structured_outputs_parse_with_the_official_client(server, client, model_name):
    messages = [{"role": "user", "content": "One order, please."}]
    parsed = client.chat.completions.parse(model=model_name, messages=messages, response_format=Order,
                                           max_tokens=200, temperature=1.0, seed=2)
    assert isinstance(parsed.choices[0].message.parsed, Order)
    regex = client.completions.create(model=model_name, prompt="Code:", max_tokens=20, temperature=1.0, seed=4,
                                      extra_body={"guided_regex": r"[A-F]{2}-\d{3}"})
    assert re.fullmatch(r"[A-F]{2}-\d{3}", regex.choices[0].text)
    assert sum(metric(server, "kvserve_grammars_compiled_total").values()) >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_calls_validate_against_the_tool_schema(client, model_name, stream):
    args = dict(model=model_name, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                tool_choice="required", max_tokens=200, temperature=1.0, seed=6)
    if stream:
        with client.chat.completions.stream(**args) as events:
            completion = events.get_final_completion()
    else:
        completion = client.chat.completions.create(**args)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "forecast"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_embeddings_with_the_official_client(client, model_name, offline):
    texts = ["Hello there", "The quick brown fox"]
    expected = offline.embed(texts)
    got = client.embeddings.create(model=model_name, input=texts)  # the client asks for base64
    for item, want in zip(got.data, expected, strict=True):
        assert item.embedding == pytest.approx(want.embedding, abs=1e-5)
    assert got.usage.prompt_tokens == sum(w.num_prompt_tokens for w in expected)
    short = client.embeddings.create(model=model_name, input=[5, 6, 7], encoding_format="float", dimensions=8)
    assert len(short.data[0].embedding) == 8 and sum(x * x for x in short.data[0].embedding) == pytest.approx(1.0)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=model_name, input="hi", dimensions=10_000)


def test_a_retained_system_prompt_survives_a_flood(client, model_name):
    """kv_retention keeps a system prompt cached through one-off prompts that evict an unretained
    one of the same length (each replica's pool holds 160 blocks; the flood fills both)."""
    rng = random.Random(5)
    words = lambda n: [rng.randrange(3, 500) for _ in range(n)]  # noqa: E731

    def cached(prompt: list[int], **extra) -> int:
        reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, temperature=0,
                                          extra_body={"ignore_eos": True, **extra})
        return reply.usage.prompt_tokens_details.cached_tokens

    kept, plain = words(192), words(192)
    cached(kept, kv_retention={"ranges": [{"start": 0, "end": 192, "priority": 100, "duration_s": 600}]})
    cached(plain)
    for _ in range(48):
        cached(words(200))
    assert cached(kept + words(8)) == 192
    assert cached(plain + words(8)) == 0


def test_bad_input_gets_openai_errors(server, client, model_name):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model_name, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model=model_name, prompt=[5] * 300)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x")
    reply = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "error" in reply.json()


def test_tokenize_and_detokenize_as_the_models_tokenizer_does(server, client, model_name, tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"], local_files_only=True)
    text = "The quick brown fox, the lazy dog."
    reply = httpx.post(f"{server}/tokenize", json={"model": model_name, "prompt": text, "return_token_strs": True})
    ids = tokenizer.encode(text)
    assert reply.json() == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                            "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    chat = httpx.post(f"{server}/tokenize", json={"messages": messages}).json()
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer.encode(templated, add_special_tokens=False) and chat["token_strs"] is None
    answer = client.chat.completions.create(model=model_name, messages=messages, max_tokens=1)
    assert answer.usage.prompt_tokens == chat["count"]

    # The chat template's options, as transformers' apply_chat_template takes them.
    opened = messages + [{"role": "assistant", "content": "Well, the"}]
    cases = [({"chat_template_kwargs": {"enable_thinking": False}}, {"enable_thinking": False}, messages),
             ({"continue_final_message": True, "add_generation_prompt": False},
              {"continue_final_message": True, "add_generation_prompt": False}, opened)]
    for options, template_kwargs, chat_messages in cases:
        got = httpx.post(f"{server}/tokenize", json={"messages": chat_messages, **options}).json()["tokens"]
        templated = tokenizer.apply_chat_template(chat_messages, tokenize=False,
                                                  **{"add_generation_prompt": True, **template_kwargs})
        assert got == tokenizer.encode(templated, add_special_tokens=False) != chat["tokens"]
        answer = client.chat.completions.create(model=model_name, messages=chat_messages, max_tokens=1,
                                                extra_body=options)
        assert answer.usage.prompt_tokens == len(got)
    assert "<think>" in tokenizer.decode(httpx.post(f"{server}/tokenize", json={
        "messages": messages, "chat_template_kwargs": {"enable_thinking": False}}).json()["tokens"])

    for body, param in (({"prompt": "x", "messages": messages}, "one of prompt and messages"), ({}, "one of prompt"),
                        ({"prompt": "x", "tools": []}, "go with messages"), ({"prompt": "x", "n": 2}, "n is not"),
                        ({"messages": messages, "continue_final_message": True}, "add_generation_prompt set to false"),
                        ({"messages": messages, "chat_template_kwargs": {"tokenize": True}}, "may not set 'tokenize'")):
        reply = httpx.post(f"{server}/tokenize", json=body)
        assert reply.status_code == 400 and param in reply.json()["error"]["message"], reply.text
    reply = httpx.post(f"{server}/detokenize", json={"tokens": [1, 10**6]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tokens", reply.text
    assert httpx.post(f"{server}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_logit_bias_with_the_official_client(server, client, model_name, tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"], local_files_only=True)
    token = tokenizer.encode(" the", add_special_tokens=False)[0]  # whole characters: the text shows it
    forced = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=4, temperature=0.8,
                                       logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tokenizer.decode([token] * 4)
    for bias, said in (({"abc": 1}, "not a token id"), ({"100000": 1}, "outside the vocabulary"),
                       ({str(token): 101}, "<= 100")):
        reply = httpx.post(f"{server}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logit_bias": bias})
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"].startswith("logit_bias") and said in error["message"], reply.text


def test_truncate_prompt_tokens_keeps_the_prompts_end(server, client, model_name):
    """vLLM's truncate_prompt_tokens: a prompt longer than the model takes runs on its last
    tokens, as if only those had been sent."""
    long_prompt = random_tokens(300, seed=7)  # max_model_len is 256
    args = dict(model=model_name, max_tokens=4, temperature=0)
    cut = client.completions.create(prompt=long_prompt, extra_body={"truncate_prompt_tokens": 100}, **args)
    tail = client.completions.create(prompt=long_prompt[-100:], **args)
    assert cut.usage.prompt_tokens == 100 and cut.choices[0].text == tail.choices[0].text
    messages = [{"role": "user", "content": "Say something. " * 40}]
    chat = client.chat.completions.create(model=model_name, messages=messages, max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 20})
    assert chat.usage.prompt_tokens == 20
    for value, said in ((0, "truncate_prompt_tokens must be >= 1"), (257, "exceeds max_model_len 256")):
        with pytest.raises(openai.BadRequestError, match=said):
            client.completions.create(prompt="x", extra_body={"truncate_prompt_tokens": value}, **args)


def completion_with_header(server, model_name, prompt, max_tokens=4):
    reply = httpx.post(f"{server}/v1/completions", json={"model": model_name, "prompt": prompt,
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.headers["x-kvserve-replica"], reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_shared_prefixes_follow_their_cache_and_groups_spread(server, model_name):
    groups = [random_tokens(96, seed=g) for g in range(4)]
    holders = {}
    for g, prefix in enumerate(groups):
        first, _ = completion_with_header(server, model_name, prefix + [3, g])
        time.sleep(0.6)  # let the stored events reach the router
        for k in range(3):
            replica, cached = completion_with_header(server, model_name, prefix + [4 + k, g])
            assert replica == first and cached >= 80
        holders[g] = first
    assert len(set(holders.values())) == 2


def test_a_hot_holder_sheds_load_to_the_other_replica(server, model_name):
    import concurrent.futures as cf

    prefix = random_tokens(96, seed=10)
    holder, _ = completion_with_header(server, model_name, prefix + [1])
    time.sleep(0.6)
    # Long generations, all sent at once: the holder is soon more than max_imbalance (3)
    # requests busier than the other replica, which must then take some.
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: completion_with_header(server, model_name, prefix + [i], 120), range(12)))
    replicas = [r for r, _ in results]
    assert holder in replicas and len(set(replicas)) == 2


def test_a_burst_waiting_together_spreads_past_the_holder(server):
    """Serve's request router routes the requests that wait together one after another and
    tells the policy of each send only once the burst is routed. From a handle of its own (in
    a Ray task, as an application's code would hold one) all twelve wait at once: each choice
    must count as load as soon as it is made."""

    def send_burst(prefix: list[int]) -> tuple[str, list[str]]:
        llm = serve.get_deployment_handle("LLMServer", APP)
        sampling = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)

        def send(tail: int):
            ids = prefix + [tail]
            serve_context._set_request_context(_internal_request_id=f"burst-{tail}")
            return llm.options(stream=True).generate.remote(GenerateRequest(
                request_id=f"burst-{tail}", prompt_token_ids=ids, sampling=sampling, prompt="",
                block_hashes=hash_block_chain(ids, 16), hash_check=hash_check_value(16), cache_salt=None,
                priority=0, kv_retention=None, lora_name=None, lora_path=None))

        holder = next(iter(send(1))).replica
        time.sleep(0.6)
        streams = [send(tail) for tail in range(2, 14)]
        replicas = [next(iter(stream)).replica for stream in streams]
        for stream in streams:
            for _ in stream:
                pass
        return holder, replicas

    holder, replicas = ray.get(ray.remote(send_burst).options(num_cpus=0).remote(random_tokens(96, seed=14)))
    assert holder in replicas and len(set(replicas)) == 2, replicas


def metric(server, name: str) -> dict[str, float]:
    text = httpx.get(f"{server}/metrics").text
    return {m[0]: float(m[1]) for m in re.findall(rf'^{name}{{replica="([^"]+)"}} (\S+)$', text, re.M)}


def test_metrics_cover_every_replica(server, model_name):
    completion_with_header(server, model_name, [9] * 40)
    text = httpx.get(f"{server}/metrics").text
    for name in ("kvserve_prefix_cache_hit_tokens_total", "kvserve_prefix_cache_queried_tokens_total",
                 "kvserve_time_to_first_token_seconds_bucket", "kvserve_kv_cache_usage_ratio",
                 "kvserve_num_requests_running", 'kvserve_routing_decisions_total{policy="kv"'):
        assert name in text
    assert len(metric(server, "kvserve_kv_cache_usage_ratio")) == 2


def test_bench_routers_counts_the_decisions_by_reason(server, model_name):
    before = routing_decisions(server)
    prefix = random_tokens(64, seed=13)
    for i in range(3):
        completion_with_header(server, model_name, prefix + [i])
        time.sleep(0.3)
    counted = routing_decisions(server) - before
    assert counted["no_cached_prefix"] >= 1 and sum(counted.values()) == 3


def test_disconnect_mid_stream_frees_the_blocks(server, model_name):
    with httpx.stream("POST", f"{server}/v1/completions", json={
        "model": model_name, "prompt": [11] * 50, "max_tokens": 200, "stream": True, "ignore_eos": True,
    }, timeout=60) as reply:
        replica = reply.headers["x-kvserve-replica"]
        lines = reply.iter_lines()
        next(lines)
    deadline = time.monotonic() + 3
    while metric(server, "kvserve_num_requests_running").get(replica, 1) > 0:
        assert time.monotonic() < deadline, "the aborted request is still running"
        time.sleep(0.1)


def test_replicas_spread_over_several_hubs_and_the_router_follows_them_all(server, model_name, tiny_checkpoints):
    """With `serving.kv_event_hubs` each replica publishes to the hub `hub_of` names, and the
    ingress follows every hub: its index holds every replica's blocks."""
    from ray import serve

    from kvserve.cluster.app import build_app
    from kvserve.cluster.config import load_config
    from kvserve.workers.kv_event_hub import hub_of

    hubs = 3
    config = load_config(None, {
        "engine": {**ENGINE, "model": str(tiny_checkpoints["llama"])},
        "serving": {"app_name": "hubs", "replicas": 2, "kv_event_hubs": hubs, "replica_cpus": 1,
                    "port": int(server.rsplit(":", 1)[1])}})
    serve.run(build_app(config), name="hubs", route_prefix="/hubs")
    base = f"{server}/hubs"
    try:
        served = set()
        for seed in range(40):
            served.add(completion_with_header(base, model_name, random_tokens(40, seed=100 + seed))[0])
            if len(served) == 2:
                break
        assert len(served) == 2, served
        deadline = time.monotonic() + 30
        while not all(metric(base, "kvserve_router_index_blocks").get(r, 0) > 0 for r in served):
            assert time.monotonic() < deadline, metric(base, "kvserve_router_index_blocks")
            time.sleep(0.5)
        for replica in served:
            relay = ray.get_actor(hub_name("hubs", hub_of(replica, hubs)), namespace="kvserve")
            assert replica in ray.get(relay.follow.remote(None, {}, -1, 0)).replicas
    finally:
        serve.delete("hubs")


def test_a_lost_hub_is_rebuilt_from_the_replicas(server, model_name):
    """The hub holds nothing the replicas cannot give again: killed, a new one comes up with
    every replica's blocks, and prefixes keep going to their holders."""
    prefix = random_tokens(96, seed=12)
    holder, _ = completion_with_header(server, model_name, prefix + [1])
    ray.kill(ray.get_actor(hub_name(APP), namespace="kvserve"), no_restart=True)
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "no new hub with both replicas"
        time.sleep(0.5)
        try:
            news = ray.get(ray.get_actor(hub_name(APP), namespace="kvserve").follow.remote(None, {}, -1, 0))
        except (ValueError, ray.exceptions.RayActorError):  # not created yet, or the dead one
            continue
        if len(news.replicas) == 2 and news.replicas[holder].snapshot.blocks:
            break
    replica, cached = completion_with_header(server, model_name, prefix + [2])
    assert replica == holder and cached >= 80


def test_killed_replica_leaves_the_index_and_serving_goes_on(server, model_name):
    prefix = random_tokens(64, seed=11)
    victim, _ = completion_with_header(server, model_name, prefix + [1])
    time.sleep(0.6)
    assert metric(server, "kvserve_router_index_blocks").get(victim, 0) > 0
    actor = next(
        a for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA") and a["name"].endswith(victim)
    )
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    deadline = time.monotonic() + 30
    while victim in metric(server, "kvserve_router_index_blocks"):
        assert time.monotonic() < deadline, "the dead replica is still in the index"
        time.sleep(0.5)
    for i in range(4):
        replica, _ = completion_with_header(server, model_name, prefix + [i])
        assert replica != victim
