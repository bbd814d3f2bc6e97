"""The API surface beyond plain completions and chat, through the official clients against
one served replica: OpenAI's Responses API, Anthropic's Messages API, completions that echo
and score their prompt, prompt logprobs, score and rerank, and vLLM's sampling extras. One
replica of its own (not test_serving's two): their traffic would leave those replicas' caches
and working sets uneven for that module's routing tests."""

import json
import re

import anthropic
import httpx
import jsonschema
import openai
import pytest
import torch
from request_shapes import WEATHER, Order, random_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvserve.workers.llm import LLM

APP = "apitest"
ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 160, "max_model_len": 256}


@pytest.fixture(scope="module")
def server(tiny_checkpoints, local_app):
    with local_app({
        "engine": {**ENGINE, "model": str(tiny_checkpoints["llama"])},
        "serving": {"app_name": APP, "replicas": 1, "replica_cpus": 1},
    }, num_cpus=3) as base:
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
    for body, param in (({"reasoning": {"effort": "enormous"}}, "reasoning.effort"),
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


def test_reasoning_effort_reaches_the_chat_template_from_every_api(server, client, claude, model_name,
                                                                  tiny_checkpoints):
    """OpenAI's `reasoning_effort` (chat), `reasoning.effort` (Responses) and Anthropic's
    `output_config.effort` are the template variable `reasoning_effort`, which the tiny
    model's template states as gpt-oss's does."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"], local_files_only=True)
    messages = [{"role": "user", "content": "Hello"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, reasoning_effort="low", return_dict=False)
    assert "Reasoning: low" in tokenizer.decode(expected)

    def tokenized(**fields):
        return httpx.post(f"{server}/tokenize", json={"model": model_name, "messages": messages, **fields}).json()["tokens"]

    assert tokenized(reasoning_effort="low") == expected == tokenized(chat_template_kwargs={"reasoning_effort": "low"})
    assert tokenized(reasoning_effort="high", chat_template_kwargs={"reasoning_effort": "low"}) == expected
    chat = client.chat.completions.create(model=model_name, messages=messages, max_tokens=2, reasoning_effort="low")
    assert chat.usage.prompt_tokens == len(expected)
    response = client.responses.create(model=model_name, input="Hello", max_output_tokens=2,
                                       reasoning={"effort": "low", "summary": "auto"})
    assert response.usage.input_tokens == len(expected) and response.reasoning.effort == "low"
    message = claude.messages.create(model=model_name, max_tokens=2, messages=messages,
                                     output_config={"effort": "low"}, service_tier="auto")
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(expected)
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model=model_name, messages=messages, max_tokens=2,
                                       reasoning_effort="extreme")


def test_anthropic_token_count_is_the_prompt_a_message_sends(claude, model_name):
    args = dict(model=model_name, system="Be brief.", messages=[{"role": "user", "content": "Hello"}],
                tools=[{"name": "forecast", "input_schema": WEATHER}])
    counted = claude.messages.count_tokens(**args)
    sent = claude.messages.create(max_tokens=2, **args)
    assert counted.input_tokens == sent.usage.input_tokens + sent.usage.cache_read_input_tokens
    assert claude.messages.count_tokens(model=model_name, messages=args["messages"]).input_tokens < counted.input_tokens


def test_anthropic_output_format_is_a_structured_output(claude, model_name):
    message = claude.messages.create(model=model_name, max_tokens=120, messages=[{"role": "user", "content": "Order"}],
                                     output_config={"format": {"type": "json_schema",
                                                               "schema": Order.model_json_schema()}})
    [block] = message.content
    Order.model_validate_json(block.text)
    assert message.stop_reason == "end_turn"


def test_vllms_structured_outputs_field(client, model_name):
    """vLLM's `structured_outputs` (json, regex, choice, grammar, json_object): one of them."""
    chat = dict(model=model_name, messages=[{"role": "user", "content": "Pick"}], max_tokens=120, temperature=1.0,
                seed=4)
    choices = ["red", "green", "blue"]
    picked = client.chat.completions.create(**chat, extra_body={"structured_outputs": {"choice": choices}})
    assert picked.choices[0].message.content in choices
    ordered = client.chat.completions.create(
        **chat, extra_body={"structured_outputs": {"json": Order.model_json_schema()}})
    Order.model_validate_json(ordered.choices[0].message.content)
    digits = client.completions.create(model=model_name, prompt="Call", max_tokens=12, temperature=1.0,
                                       extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", digits.choices[0].text)
    for extra in ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, {"structured_outputs": {}},
                  {"structured_outputs": {"choice": ["a"]}, "guided_regex": "a+"},
                  {"structured_outputs": {"whitespace_pattern": " "}}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**chat, extra_body=extra)
        assert "structured_outputs" in str(refused.value), extra


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
