"""Bad input over HTTP on a real local Ray + Serve: every kind gets a 4xx with an OpenAI-style
error body naming the parameter, and the server keeps serving."""

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

APP = "badinput"
MAX_MODEL_LEN = 256
MAX_REQUEST_BYTES = 64 * 1024
VOCAB = 512  # the tiny model's
LEAKS = ("Traceback", "errors.pydantic.dev", "Input should", "Value error", 'File "')


def with_strict_template(checkpoint: Path, folder: Path) -> Path:
    """A copy of `checkpoint` whose chat template refuses tool messages, as many real ones
    refuse roles or shapes they were not trained on."""
    copy = shutil.copytree(checkpoint, folder / "strict-template")
    template = (copy / "chat_template.jinja").read_text()
    refusal = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
               "{{ raise_exception('no tool messages') }}{% endif %}{% endfor %}")
    (copy / "chat_template.jinja").write_text(refusal + template)
    return copy


@pytest.fixture(scope="module")
def server(tiny_checkpoints, local_app, tmp_path_factory):
    model = with_strict_template(tiny_checkpoints["llama"], tmp_path_factory.mktemp("bad-input"))
    with local_app({
        "engine": {"model": str(model), "device": "cpu", "dtype": "float32",
                   "num_kv_blocks": 64, "max_model_len": MAX_MODEL_LEN},
        "serving": {"app_name": APP, "replicas": 1, "replica_cpus": 0.5, "max_request_bytes": MAX_REQUEST_BYTES,
                    "reasoning_parser": "deepseek_r1"},
    }, num_cpus=2) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client


def completion(**fields) -> dict:
    return {"prompt": "Hello", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


C, CHAT = "/v1/completions", "/v1/chat/completions"
CASES = {
    # id: (method, route, body (bytes: sent as is), status, param)
    "malformed json": ("POST", C, b'{"prompt": "x",', 400, None),
    "body not an object": ("POST", C, b"[1, 2]", 400, None),
    "empty body": ("POST", C, b"", 400, None),
    "missing prompt": ("POST", C, {"max_tokens": 2}, 400, "prompt"),
    "prompt wrong type": ("POST", C, completion(prompt={"a": 1}), 400, "prompt"),
    "n wrong type": ("POST", C, completion(n="two"), 400, "n"),
    "unknown field": ("POST", C, completion(bogus=1), 400, "bogus"),
    "max_tokens 0": ("POST", C, completion(max_tokens=0), 400, "max_tokens"),
    "max_tokens negative": ("POST", C, completion(max_tokens=-3), 400, "max_tokens"),
    "max_tokens beyond context": ("POST", C, completion(max_tokens=10**6), 400, "max_tokens"),
    "prompt plus max_tokens": ("POST", C, completion(prompt=[5] * 200, max_tokens=100), 400, "max_tokens"),
    "prompt fills the context": ("POST", C, completion(prompt=[5] * MAX_MODEL_LEN), 400, "prompt"),
    "temperature negative": ("POST", C, completion(temperature=-0.5), 400, "temperature"),
    "temperature nan": ("POST", C, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    "top_p 0": ("POST", C, completion(top_p=0), 400, "top_p"),
    "top_p over 1": ("POST", C, completion(top_p=1.5), 400, "top_p"),
    "n 0": ("POST", C, completion(n=0), 400, "n"),
    "n over the maximum": ("POST", C, completion(n=17), 400, "n"),
    "logprobs over 20": ("POST", C, completion(logprobs=21), 400, "logprobs"),
    "top_logprobs over 20": ("POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    "empty prompt": ("POST", C, completion(prompt=""), 400, "prompt"),
    "empty prompt list": ("POST", C, completion(prompt=[]), 400, "prompt"),
    "empty token list": ("POST", C, completion(prompt=[[]]), 400, "prompt"),
    "negative token id": ("POST", C, completion(prompt=[1, -1]), 400, "prompt"),
    "token id past 2^63": ("POST", C, completion(prompt=[2**63]), 400, "prompt"),
    "token id past 2^64": ("POST", C, completion(prompt=[[3], [2**64]]), 400, "prompt"),
    "token id past the vocabulary": ("POST", C, completion(prompt=[VOCAB]), 400, "prompt"),
    "stop token id negative": ("POST", C, completion(stop_token_ids=[-1]), 400, "stop_token_ids"),
    "stop token id past the vocabulary": ("POST", C, completion(stop_token_ids=[2**70]), 400, "stop_token_ids"),
    "top_k past the vocabulary": ("POST", C, completion(top_k=10**30), 400, "top_k"),
    "unknown model": ("POST", C, completion(model="gpt-9"), 404, "model"),
    "unknown role": ("POST", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    "a message the chat template refuses": ("POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400,
                                             "messages"),
    "content the template cannot take": (
        "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]),
        400, "messages[0].content"),
    "no messages": ("POST", CHAT, chat(messages=[]), 400, "messages"),
    "too many stop strings": ("POST", C, completion(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    "empty stop string": ("POST", C, completion(stop=["x", ""]), 400, "stop"),
    "empty cache_salt": ("POST", C, completion(cache_salt=""), 400, "cache_salt"),
    "cache_salt not printable": ("POST", C, completion(cache_salt="a\nb"), 400, "cache_salt"),
    "cache_salt too long": ("POST", C, completion(cache_salt="s" * 257), 400, "cache_salt"),
    "cache_salt not a string": ("POST", C, completion(cache_salt=5), 400, "cache_salt"),
    "body too large": ("POST", C, completion(prompt="x" * MAX_REQUEST_BYTES), 413, None),
    "regex that does not compile": ("POST", C, completion(guided_regex="a(b"), 400, "guided_regex"),
    "schema that does not compile": ("POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}), 400, "response_format"),
    "two output constraints": ("POST", C, completion(guided_regex="a", guided_choice=["a"]), 400, "guided_choice"),
    "tool_choice naming no tool": ("POST", CHAT, chat(tool_choice={"type": "function", "function": {"name": "f"}}),
                                   400, "tool_choice"),
    "tool call arguments not an object": ("POST", CHAT, chat(messages=[{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "1"}}]}]), 400,
        "messages[0].tool_calls[0].function.arguments"),
    "unknown route": ("GET", "/v1/nothing", None, 404, None),
    "wrong method": ("GET", C, None, 405, None),
}


def send(client: httpx.Client, method: str, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.request(method, route, content=body, headers={"content-type": "application/json"})
    return client.request(method, route, json=body)


def assert_error_body(reply: httpx.Response) -> dict:
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and not any(leak in error["message"] for leak in LEAKS), error["message"]
    return error


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_an_openai_error_naming_the_parameter(server, case):
    method, route, body, status, param = CASES[case]
    reply = send(server, method, route, body)
    assert reply.status_code == status, reply.text
    assert assert_error_body(reply)["param"] == param


def test_messages_read_as_sentences(server):
    def message(route, body):
        return send(server, "POST", route, body).json()["error"]["message"]

    assert message(C, b'{"prompt": "x",') == "the request body is not valid JSON"
    assert message(C, b"[1]") == "the request body must be a JSON object"
    assert message(C, completion(temperature=-1)) == "temperature must be >= 0"
    assert message(C, completion(n=17)) == "n must be <= 16"
    assert message(C, completion(prompt=[-1])) == "token id -1 in prompt is outside the vocabulary [0, 512)"


def test_a_streamed_body_over_the_limit_gets_413(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    reply = server.post(C, content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert_error_body(reply)


def replica_logs() -> dict[Path, int]:
    """The Serve replica log files of this Ray session and their sizes."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return {path: path.stat().st_size for path in logs.glob("replica_*LLMServer*.log")}


def test_a_request_the_engine_refuses_is_a_400_logged_in_one_line(server):
    """16 samples of up to 200 tokens want more KV blocks than the replica's 64: the engine
    refuses, the client gets a 400 with the engine's reason, and the replica logs it at INFO
    in one line, no traceback."""
    before = replica_logs()
    reply = server.post(C, json=completion(n=16, max_tokens=200))
    assert reply.status_code == 400 and "KV blocks" in reply.json()["error"]["message"], reply.text
    time.sleep(1)  # the log line reaches its file
    written = "".join(path.read_bytes()[before.get(path, 0):].decode(errors="replace")
                      for path in replica_logs())
    assert "refused: the request needs up to" in written and "Traceback" not in written


def test_min_tokens_over_a_fully_stopped_vocabulary_is_a_400_and_the_replica_serves_on(server):
    """Every token a stop token and min_tokens: once a sampler failure that broke the replica."""
    reply = server.post(C, json=completion(min_tokens=1, stop_token_ids=list(range(512)), temperature=0.8))
    assert reply.status_code == 400 and "whole vocabulary" in reply.json()["error"]["message"], reply.text
    test_still_serves_after_bad_input(server)


def test_still_serves_after_bad_input(server):
    reply = server.post(C, json=completion(max_tokens=4, ignore_eos=True))
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4


def test_a_reasoning_models_thinking_comes_apart(server):
    """This server reads chat outputs as DeepSeek-R1's, whose thinking starts with the output:
    the tiny model never closes it, so all of its output is reasoning_content, whole or streamed."""
    prompt = server.post("/tokenize", json={"messages": chat()["messages"]}).json()["tokens"]
    text = server.post(C, json=completion(prompt=prompt, max_tokens=6, temperature=0, ignore_eos=True)).json()
    body = chat(max_tokens=6, temperature=0, ignore_eos=True)
    reply = server.post(CHAT, json=body).json()
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == text["choices"][0]["text"] and message["content"] is None
    assert reply["usage"]["completion_tokens_details"] == {"reasoning_tokens": 6}  # counted by the tags' ids
    with server.stream("POST", CHAT, json={**body, "stream": True}) as reply:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in reply.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert not any(d.get("content") for d in deltas)


def test_a_reasoning_models_thinking_is_a_reasoning_item_of_its_response(server):
    body = chat(max_tokens=6, temperature=0)
    completion = server.post(CHAT, json=body).json()
    message = completion["choices"][0]["message"]
    request = {"input": body["messages"], "max_output_tokens": 6, "temperature": 0}
    reply = server.post("/v1/responses", json=request).json()
    [item] = reply["output"]
    assert item["type"] == "reasoning" and item["content"][0]["text"] == message["reasoning_content"]
    reasoning_tokens = completion["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert reply["usage"]["output_tokens_details"]["reasoning_tokens"] == reasoning_tokens > 0
    with server.stream("POST", "/v1/responses", json={**request, "stream": True}) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert "".join(deltas) == item["content"][0]["text"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["output"][0]["type"] == "reasoning"
    assert events[-1]["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] == reasoning_tokens
    name = server.get("/v1/models").json()["data"][0]["id"]
    anthropic_reply = server.post("/v1/messages", json={"model": name, **body}).json()
    assert anthropic_reply["content"] == [{"type": "thinking", "thinking": message["reasoning_content"], "signature": ""}]


def test_thinking_turned_off_leaves_the_whole_output_an_answer(server):
    """With `enable_thinking` false the template closes an empty thinking block in the prompt:
    the output is all answer, though this server reads outputs as DeepSeek-R1's (which start
    inside the thinking). Anthropic's `thinking` sets that variable."""
    name = server.get("/v1/models").json()["data"][0]["id"]
    body = chat(max_tokens=6, temperature=0)  # no ignore_eos: the Messages API has none
    thinking = server.post(CHAT, json=body).json()["choices"][0]["message"]
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    answered = server.post(CHAT, json=off).json()
    answer = answered["choices"][0]["message"]
    assert answer["reasoning_content"] is None and answer["content"]
    assert answered["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert thinking["reasoning_content"] and thinking["content"] is None
    with server.stream("POST", CHAT, json={**off, "stream": True}) as reply:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in reply.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(d.get("content") or "" for d in deltas) == answer["content"]
    assert not any(d.get("reasoning_content") for d in deltas)
    for setting, content in (({"type": "disabled"}, [{"type": "text", "text": answer["content"]}]),
                             ({"type": "adaptive"},
                              [{"type": "thinking", "thinking": thinking["reasoning_content"], "signature": ""}])):
        reply = server.post("/v1/messages", json={"model": name, **body, "thinking": setting}).json()
        assert reply.get("content") == content, reply
    too_big = server.post("/v1/messages", json={"model": name, **body, "thinking": {"type": "enabled",
                                                                                     "budget_tokens": 6}})
    assert too_big.status_code == 400 and "budget_tokens (6) must be less than max_tokens (6)" in too_big.text


def test_a_reasoning_models_structured_output_holds_after_its_thinking(server):
    """The grammar waits for `</think>` (made the first token here by a bias, so that the
    thinking is empty); the answer then follows it. Where the prompt closed the thinking
    (`enable_thinking` false) the grammar holds from the start."""
    think_end = server.post("/tokenize", json={"prompt": "</think>", "add_special_tokens": False}).json()["tokens"]
    assert len(think_end) == 1
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    body = chat(max_tokens=40, temperature=0, logit_bias={str(think_end[0]): 100},
                response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    for extra in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
        message = server.post(CHAT, json={**body, **extra}).json()["choices"][0]["message"]
        assert json.loads(message["content"]) in ({"ok": True}, {"ok": False})
        assert not message.get("reasoning_content")


def test_a_thinking_token_budget_ends_the_thinking(server):
    """vLLM's thinking_token_budget (and Anthropic's thinking.budget_tokens): the thinking, which
    the bias would keep going, ends after that many tokens, and the answer follows."""
    name = server.get("/v1/models").json()["data"][0]["id"]
    [think_end] = server.post("/tokenize", json={"prompt": "</think>", "add_special_tokens": False}).json()["tokens"]
    body = chat(max_tokens=10, temperature=0, logit_bias={str(think_end): -100})
    endless = server.post(CHAT, json=body).json()["choices"][0]["message"]
    assert endless["content"] is None
    bounded = server.post(CHAT, json={**body, "thinking_token_budget": 3}).json()["choices"][0]["message"]
    assert endless["reasoning_content"].startswith(bounded["reasoning_content"]) and bounded["content"]
    assert server.post("/tokenize", json={"prompt": bounded["reasoning_content"], "add_special_tokens": False}
                       ).json()["count"] <= 3
    unbiased = {k: v for k, v in body.items() if k != "logit_bias"}  # the Messages API has no logit_bias
    chat_bounded = server.post(CHAT, json={**unbiased, "thinking_token_budget": 3}).json()["choices"][0]["message"]
    messages = {"model": name, **unbiased, "thinking": {"type": "enabled", "budget_tokens": 3}}
    reply = server.post("/v1/messages", json=messages).json()
    assert reply["content"] == [{"type": "thinking", "thinking": chat_bounded["reasoning_content"], "signature": ""},
                                {"type": "text", "text": chat_bounded["content"]}]
    refused = server.post(CHAT, json={**body, "thinking_token_budget": 3, "bad_words": ["x"]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "thinking_token_budget"


# -- fuzz ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
token_ids = st.lists(st.integers(-3, VOCAB + 3) | st.integers(), max_size=6)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]) | json_values},
                          optional={"content": st.text(max_size=12) | json_values, "name": json_values}),
    max_size=3,
) | json_values
SHARED = {
    "model": json_values, "n": st.integers(-1, 3) | json_values, "temperature": st.floats() | json_values,
    "top_p": st.floats() | json_values, "top_k": st.integers() | json_values, "min_p": st.floats(),
    "stop": st.lists(st.text(max_size=3), max_size=3) | json_values, "seed": st.integers(),
    "presence_penalty": st.floats(), "frequency_penalty": st.floats(), "repetition_penalty": st.floats(),
    "stream": st.booleans() | json_values, "stream_options": json_values, "min_tokens": st.integers(),
    "ignore_eos": st.booleans(), "stop_token_ids": token_ids | json_values, "skip_special_tokens": json_values,
    "include_stop_str_in_output": st.booleans(), "cache_salt": st.text(max_size=4) | json_values,
    "priority": st.integers(), "user": json_values, "prompt_logprobs": st.integers(-1, 22) | json_values,
    "allowed_token_ids": token_ids | json_values, "return_tokens_as_token_ids": json_values,
    "add_special_tokens": json_values, "bad_words": st.lists(st.text(max_size=4), max_size=3) | json_values,
    "response_format": json_values, "guided_json": json_values, "guided_regex": st.text(max_size=8) | json_values,
    "guided_choice": json_values, "guided_grammar": st.text(max_size=12) | json_values,
}
COMPLETION_FIELDS = {**SHARED, "prompt": st.text(max_size=20) | token_ids | st.lists(token_ids, max_size=2) | json_values,
                     "logprobs": st.integers(-1, 22) | json_values, "echo": st.booleans() | json_values,
                     "suffix": json_values}
CHAT_FIELDS = {**SHARED, "messages": messages, "logprobs": json_values, "top_logprobs": st.integers(-1, 22),
               "max_completion_tokens": st.integers(-1, 4) | json_values,
               "add_generation_prompt": json_values, "tools": json_values,
               "tool_choice": st.sampled_from(["none", "auto", "required"]) | json_values}


RESPONSES_FIELDS = {
    "model": json_values, "input": st.text(max_size=12) | messages | json_values, "instructions": json_values,
    "temperature": st.floats() | json_values, "top_p": st.floats(), "tools": json_values,
    "tool_choice": st.sampled_from(["none", "auto", "required"]) | json_values, "text": json_values,
    "stream": st.booleans() | json_values, "previous_response_id": json_values, "seed": st.integers(),
    "store": json_values, "metadata": json_values, "truncation": json_values,
}


MESSAGES_FIELDS = {
    "model": json_values, "messages": messages, "system": st.text(max_size=8) | json_values,
    "stop_sequences": st.lists(st.text(max_size=3), max_size=2) | json_values, "stream": st.booleans() | json_values,
    "temperature": st.floats() | json_values, "top_k": st.integers() | json_values, "tools": json_values,
    "tool_choice": json_values, "metadata": json_values,
}


def bodies(fields: dict, length: str = "max_tokens"):
    """Random values for the known fields (any subset), random extra fields, and a `length`
    (the field that bounds the output) that is small when valid, so that accepted requests
    finish quickly."""
    known = st.fixed_dictionaries({length: st.integers(-1, 4) | json_values}, optional=fields)
    extra = st.dictionaries(st.text(min_size=1, max_size=6), json_values, max_size=2)
    return st.tuples(known, extra).map(lambda pair: {**pair[1], **pair[0]}) | json_values


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(route_and_body=st.sampled_from([C]).flatmap(lambda r: st.tuples(st.just(r), bodies(COMPLETION_FIELDS)))
       | st.tuples(st.just(CHAT), bodies(CHAT_FIELDS))
       | st.tuples(st.just("/v1/responses"), bodies(RESPONSES_FIELDS, "max_output_tokens"))
       | st.tuples(st.just("/v1/messages"), bodies(MESSAGES_FIELDS)))
def test_fuzzed_bodies_never_get_a_5xx(server, route_and_body):
    route, body = route_and_body
    payload = json.dumps(body, allow_nan=True).encode()
    reply = send(server, "POST", route, payload)
    assert reply.status_code < 500, (body, reply.text)
    if reply.status_code >= 400:
        assert_error_body(reply)
