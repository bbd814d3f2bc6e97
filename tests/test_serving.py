"""The whole serving path on a real local Ray cluster: the `openai` client against the
ingress, two engine replicas behind the KV-aware router."""

import json
import random
import re
import time
from typing import Annotated, Literal

import anthropic
import httpx
import jsonschema
import openai
import pytest
import ray
from pydantic import BaseModel, Field
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvserve.cluster.bench.routers import routing_decisions
from kvserve.workers.kv_event_hub import hub_name
from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams

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
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)


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


def test_logprobs_by_token_id_and_special_tokens(client, model_name, tiny_checkpoints):
    """vLLM's return_tokens_as_token_ids and add_special_tokens (a BOS: on by default for a
    text prompt, off for chat, whose template writes its own)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"], local_files_only=True)
    by_id = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    reply = client.completions.create(model=model_name, prompt="Hello there", max_tokens=4, temperature=0,
                                      logprobs=1, extra_body=by_id).choices[0]
    assert tokenizer.decode([int(t.removeprefix("token_id:")) for t in reply.logprobs.tokens]) == reply.text
    assert all(key.startswith("token_id:") for top in reply.logprobs.top_logprobs for key in top)
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=1, extra_body=by_id).choices[0]
    assert all(e.token.startswith("token_id:") and e.top_logprobs[0].token.startswith("token_id:")
               for e in chat.logprobs.content)
    prompt_tokens = lambda **extra: client.completions.create(  # noqa: E731
        model=model_name, prompt="Hello there", max_tokens=1, extra_body=extra).usage.prompt_tokens
    chat_tokens = lambda **extra: client.chat.completions.create(  # noqa: E731
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
        extra_body=extra).usage.prompt_tokens
    assert prompt_tokens() == prompt_tokens(add_special_tokens=False) + 1
    assert chat_tokens(add_special_tokens=True) == chat_tokens() + 1


class Order(BaseModel):
    size: Literal["small", "large"]
    count: Annotated[int, Field(ge=1, le=99)]
    paid: bool


WEATHER = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
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


def test_responses_api_text_plain_and_streamed(client, model_name):
    """OpenAI's Responses API is the chat completion it amounts to: instructions as the system
    message; the stream's events add up, in the client's own accumulator, to the response."""
    chat = client.chat.completions.create(model=model_name, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    args = dict(model=model_name, instructions="Be brief.", input="Hello", max_output_tokens=8, temperature=0)
    reply = client.responses.create(**args)
    assert reply.output_text == chat.choices[0].message.content
    assert reply.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                     chat.usage.completion_tokens)
    with client.responses.stream(**args) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == reply.output_text
    assert final.usage.output_tokens == reply.usage.output_tokens and final.status == reply.status
    items = client.responses.create(model=model_name, max_output_tokens=8, temperature=0, input=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}])
    assert items.output_text == reply.output_text


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_calls_and_their_outputs(client, model_name, stream):
    tools = [{"type": "function", "name": "forecast", "parameters": WEATHER}]
    asked = [{"role": "user", "content": "Weather?"}]
    args = dict(model=model_name, input=asked, tools=tools, tool_choice="required", max_output_tokens=200,
                temperature=1.0, extra_body={"seed": 6})
    if stream:
        with client.responses.stream(**args) as events:
            reply = events.get_final_response()
    else:
        reply = client.responses.create(**args)
    calls = [item for item in reply.output if item.type == "function_call"]
    assert calls and reply.status == "completed"
    for call in calls:
        assert call.name == "forecast" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    answered = asked + [{"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
                        for c in calls]
    answered += [{"type": "function_call_output", "call_id": c.call_id, "output": '{"celsius": 3}'} for c in calls]
    follow = client.responses.create(model=model_name, input=answered, tools=tools, max_output_tokens=4)
    assert follow.usage.input_tokens > reply.usage.input_tokens


def test_responses_structured_output_and_refusals(server, client, model_name):
    parsed = client.responses.parse(model=model_name, input=[{"role": "user", "content": "One order, please."}],
                                    text_format=Order, max_output_tokens=200, temperature=1.0, extra_body={"seed": 2})
    assert isinstance(parsed.output_parsed, Order)
    for body, param in (({"reasoning": {"effort": "low"}}, "reasoning"),
                        ({"max_output_tokens": 0}, "max_output_tokens"),
                        ({"input": []}, "input"), ({"input": [{"type": "input_image"}]}, "input[0]"),
                        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].function_call.call_id")):
        reply = httpx.post(f"{server}/v1/responses", json={"input": "hi", **body})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


@pytest.mark.parametrize("stream", [False, True])
def test_stored_responses_continue_a_conversation(client, model_name, stream):
    """A stored response is kept with its conversation: previous_response_id runs the next
    input after it, as if the whole conversation had been sent; it can be fetched and deleted."""
    args = dict(model=model_name, max_output_tokens=4, temperature=0)
    if stream:
        with client.responses.stream(input="Hello", **args) as events:
            first = events.get_final_response()
    else:
        first = client.responses.create(input="Hello", **args)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    follow = client.responses.create(previous_response_id=first.id, input="And then?", **args)
    whole = client.responses.create(store=False, input=[
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}], **args)
    assert follow.previous_response_id == first.id
    assert (follow.output_text, follow.usage.input_tokens) == (whole.output_text, whole.usage.input_tokens)
    third = client.responses.create(previous_response_id=follow.id, input="Go on.", **args)
    assert third.usage.input_tokens > follow.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)  # store: false
    client.responses.delete(first.id)
    for gone in (lambda: client.responses.retrieve(first.id),
                 lambda: client.responses.create(previous_response_id=first.id, input="x", **args)):
        with pytest.raises(openai.NotFoundError):
            gone()


def test_anthropic_messages_with_the_official_client(claude, client, model_name):
    """Anthropic's Messages API is the chat completion it amounts to: plain, streamed through
    the anthropic client's own accumulator, cut by a stop sequence."""
    chat = client.chat.completions.create(model=model_name, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    args = dict(model=model_name, max_tokens=8, system="Be brief.", messages=[{"role": "user", "content": "Hello"}],
                extra_body={"temperature": 0})  # the client no longer sends sampling settings itself
    reply = claude.messages.create(**args)
    [block] = reply.content
    assert block.text == chat.choices[0].message.content
    assert reply.stop_reason == ("max_tokens" if chat.choices[0].finish_reason == "length" else "end_turn")
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens
    with claude.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == block.text and final.stop_reason == reply.stop_reason
    assert final.usage.output_tokens == reply.usage.output_tokens
    full = claude.messages.create(**{**args, "max_tokens": 30}).content[0].text
    stop = full[4:7]
    cut = claude.messages.create(**{**args, "max_tokens": 30}, stop_sequences=[stop])
    assert (cut.content[0].text, cut.stop_reason, cut.stop_sequence) == (full[: full.index(stop)], "stop_sequence", stop)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_use_and_results(claude, model_name, stream):
    asked = [{"role": "user", "content": "Weather?"}]
    args = dict(model=model_name, max_tokens=200, messages=asked, tool_choice={"type": "any"},
                tools=[{"name": "forecast", "input_schema": WEATHER}], extra_body={"temperature": 0})
    if stream:
        with claude.messages.stream(**args) as events:
            reply = events.get_final_message()
    else:
        reply = claude.messages.create(**args)
    calls = [block for block in reply.content if block.type == "tool_use"]
    assert calls and reply.stop_reason == "tool_use"
    for call in calls:
        assert call.name == "forecast"
        jsonschema.validate(call.input, WEATHER)
    answered = asked + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.input}
                                          for c in calls]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c.id, "content": "3 C"} for c in calls]}]
    follow = claude.messages.create(model=model_name, max_tokens=4, messages=answered, tools=args["tools"])
    assert follow.usage.input_tokens + follow.usage.cache_read_input_tokens > reply.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=model_name, max_tokens=4, messages=[{"role": "robot", "content": "x"}])


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


def test_score_and_rerank_are_cosines_of_the_embeddings(server, model_name, offline):
    query, documents = "Hello there", ["The quick brown fox", "Hello there, friend", "Numbers: 1 2 3"]
    vectors = [torch.tensor(o.embedding) for o in offline.embed([query, *documents])]
    expected = [torch.nn.functional.cosine_similarity(vectors[0], v, dim=0).item() for v in vectors[1:]]
    for route, body in (("/v1/score", {"text_1": query, "text_2": documents}),
                        ("/score", {"text_1": documents, "text_2": [query] * 3})):
        scored = httpx.post(f"{server}{route}", json={"model": model_name, **body}).json()
        assert [d["index"] for d in scored["data"]] == [0, 1, 2]
        assert [d["score"] for d in scored["data"]] == pytest.approx(expected, abs=1e-5)
    best = sorted(range(3), key=lambda i: -expected[i])
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        ranked = httpx.post(f"{server}{route}", json={"query": query, "documents": documents, "top_n": 2}).json()
        assert [r["index"] for r in ranked["results"]] == best[:2]
        assert [r["document"]["text"] for r in ranked["results"]] == [documents[i] for i in best[:2]]
        assert ranked["usage"]["total_tokens"] == sum(o.num_prompt_tokens for o in offline.embed([query, *documents]))
    for route, body, param in (("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
                               ("/score", {"text_1": "", "text_2": "c"}, "text_1"),
                               ("/rerank", {"query": "q", "documents": []}, "documents"),
                               ("/rerank", {"query": "q", "documents": ["d", ""]}, "documents")):
        reply = httpx.post(f"{server}{route}", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


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


def test_allowed_token_ids_with_the_official_client(server, client, model_name):
    allowed = [101, 202, 303]
    named = {f"token_id:{t}" for t in allowed}  # by id: a token may be part of a character, with no text alone
    extra = {"allowed_token_ids": allowed, "ignore_eos": True, "return_tokens_as_token_ids": True}
    reply = client.completions.create(model=model_name, prompt="Pick one:", max_tokens=6, temperature=1.0,
                                      logprobs=0, extra_body=extra)
    tokens = reply.choices[0].logprobs.tokens
    assert len(tokens) == 6 and set(tokens) <= named
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, logprobs=True, extra_body=extra)
    assert {e.token for e in chat.choices[0].logprobs.content} <= named
    for extra, said in (({"allowed_token_ids": []}, "must not be empty"), ({"allowed_token_ids": [3, 99999]}, "outside"),
                        ({"allowed_token_ids": [3], "guided_regex": "a+"}, "structured output")):
        reply = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra})
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == "allowed_token_ids" and said in error["message"], reply.text


def test_bad_words_with_the_official_client(server, client, model_name):
    args = dict(model=model_name, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=0)
    plain = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0]
    word = next(token for token in plain.logprobs.tokens if token.strip())
    banned = client.completions.create(**args, extra_body={"ignore_eos": True, "bad_words": [word]}).choices[0]
    assert word in plain.logprobs.tokens and word not in banned.logprobs.tokens
    assert banned.text != plain.text
    reply = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "bad_words": ["a"], "allowed_token_ids": [3]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "bad_words", reply.text


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


def hf_prompt_logprobs(tiny_checkpoints, ids: list[int]) -> list[float]:
    """transformers' logprob of each token of `ids` after the first, given those before it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).eval()
    with torch.inference_mode():
        logprobs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()


def test_echo_scores_a_text_as_lm_eval_reads_it(client, model_name, tiny_checkpoints):
    """lm-evaluation-harness's loglikelihood request: context + continuation as token ids,
    echo, logprobs 1, max_tokens 1; it sums token_logprobs[len(context):-1] and calls the
    continuation greedy when each token's logprob is the top one's."""
    context, continuation = random_tokens(30, seed=3), random_tokens(6, seed=4)
    ids = context + continuation
    expected = hf_prompt_logprobs(tiny_checkpoints, ids)
    reply = client.completions.create(model=model_name, prompt=ids, max_tokens=1, logprobs=1, echo=True,
                                      temperature=0)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:-1] == pytest.approx(expected, abs=1e-4)
    assert sum(logprobs.token_logprobs[len(context):-1]) == pytest.approx(sum(expected[len(context) - 1:]), abs=1e-3)
    assert all(len(top) == 1 and max(top.values()) >= lp - 1e-6
               for top, lp in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    plain = client.completions.create(model=model_name, prompt=ids, max_tokens=1, temperature=0)
    assert choice.text.endswith(plain.choices[0].text) and len(choice.text) > len(plain.choices[0].text)
    assert reply.usage.completion_tokens == 1


def test_echo_without_generating_and_streamed(client, model_name, tiny_checkpoints):
    prompt = "The quick brown fox jumps over"
    scored = client.completions.create(model=model_name, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and len(choice.logprobs.tokens) == scored.usage.prompt_tokens
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])  # tokens of one text share a key
    args = dict(model=model_name, prompt=prompt, max_tokens=5, echo=True, logprobs=0, temperature=0,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    assert chunks[0].text.startswith(prompt)
    assert "".join(c.text for c in chunks) == whole.text
    assert sum((c.logprobs.tokens for c in chunks), []) == whole.logprobs.tokens
    assert sum((c.logprobs.text_offset for c in chunks), []) == whole.logprobs.text_offset


def test_vllm_prompt_logprobs_in_completions_and_chat(server, client, model_name, tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"], local_files_only=True)
    ids = random_tokens(12, seed=5)
    expected = hf_prompt_logprobs(tiny_checkpoints, ids)
    reply = client.completions.create(model=model_name, prompt=ids, max_tokens=2, extra_body={"prompt_logprobs": 3})
    ranked = reply.choices[0].model_extra["prompt_logprobs"]
    assert ranked[0] is None and len(ranked) == len(ids)
    for token, entry, logprob in zip(ids[1:], ranked[1:], expected):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(logprob, abs=1e-4) and own["decoded_token"] == tokenizer.decode([token])
        assert len(entry) == (3 if own["rank"] <= 3 else 4)  # the top 3, and the prompt's token if not among them
        assert sorted(e["rank"] for e in entry.values())[:3] == [1, 2, 3]
    messages = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(model=model_name, messages=messages, max_tokens=2,
                                          extra_body={"prompt_logprobs": 0})
    scored = chat.model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == chat.usage.prompt_tokens
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] >= 1 for entry in scored[1:])
    stream = client.chat.completions.create(model=model_name, messages=messages, max_tokens=2, stream=True,
                                            extra_body={"prompt_logprobs": 0})
    assert [c.model_extra["prompt_logprobs"] for c in stream if "prompt_logprobs" in c.model_extra] == [scored]
    for body, param in (({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs")):
        reply = httpx.post(f"{server}/v1/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def random_tokens(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(count)]


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
