"""Tool calling: each family's reader on the text its chat template writes for an assistant's
tool calls, streamed and whole; the request fields and the output constraint tool_choice
forces; the OpenAI bodies and chunks, read back by the official client's own types."""

import json

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from kvserve.cluster.tiny_model import build_tokenizer
from kvserve.router.generation import _chat_delta, _chat_message, _tool_call_delta, _with_tool_calls
from kvserve.router.openai_schema import ChatCompletionRequest, validation_problem
from kvserve.router.reasoning import ReasoningSplitter
from kvserve.router.responses import ChoiceState, completion_body, chunk_body
from kvserve.router.tool_parsers import (
    FORMATS, REQUIRED_FORMAT, NamedCallReader, ToolCallReader, format_for_model, required_calls_schema,
)
from kvserve.workers.protocol import SampleDelta

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                   "b": {"type": "array"}}}}}
CALLS = [("get_weather", {"city": "Paris", "unit": "c"}), ("add", {"a": 1, "b": [2, "}", {"x": "\"]"}]})]

# The tool-call parts of each family's template, as their checkpoints ship them (Qwen 2.5,
# Llama 3.1 and Mistral 7B Instruct v0.3), around a minimal conversation.
TEMPLATES = {
    "hermes": (
        "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}"
        "{% endfor %}\n</tools><|im_end|>\n{% endif %}"
        "{%- for message in messages %}"
        "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
        "{%- if message.content %}{{ '\\n' + message.content }}{% endif %}"
        "{%- for tool_call in message.tool_calls %}{% set tool_call = tool_call.function %}"
        "{{- '\n<tool_call>\n{\"name\": \"' }}{{ tool_call.name }}{{ '\", \"arguments\": ' }}"
        "{{- tool_call.arguments | tojson }}{{ '}\n</tool_call>' }}{% endfor %}<|im_end|>\n"
        "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3_json": (
        "{%- for message in messages %}"
        "{%- if message.role == 'assistant' and message.tool_calls %}"
        "{%- set tool_call = message.tool_calls[0].function %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{ '\"parameters\": ' }}"
        "{{- tool_call.arguments | tojson }}{{ '}' }}<|eot_id|>"
        "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
        "{%- endif %}{% endfor %}"
        "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "mistral": (
        "{%- for message in messages %}"
        "{%- if message.role == 'user' %}[INST] {{ message.content }}[/INST]"
        "{%- elif message.tool_calls %}{{ '[TOOL_CALLS] [' }}"
        "{%- for tool_call in message.tool_calls %}{% set out = tool_call.function | tojson %}{{ out[:-1] }}"
        "{{- ', \"id\": \"' + tool_call.id + '\"}' }}{% if not loop.last %}{{ ', ' }}{% else %}{{ ']</s>' }}"
        "{%- endif %}{% endfor %}{% endif %}{% endfor %}"
    ),
}
END_OF_TURN = {"hermes": "<|im_end|>\n", "llama3_json": "<|eot_id|>", "mistral": "</s>"}
USER = {"role": "user", "content": "What is the weather in Paris?"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def assistant_turn(tokenizer, family: str, calls: list[tuple[str, dict]], content: str = "") -> str:
    """What the family's template writes for an assistant turn making `calls`: the text a
    model trained on it generates."""
    tool_calls = [{"id": f"call{i:05d}", "type": "function", "function": {"name": name, "arguments": arguments}}
                  for i, (name, arguments) in enumerate(calls)]
    conversation = [USER, {"role": "assistant", "content": content, "tool_calls": tool_calls}]
    render = tokenizer.apply_chat_template
    prompt = render([USER], tools=[WEATHER, ADD], chat_template=TEMPLATES[family], tokenize=False,
                    add_generation_prompt=family != "mistral")
    whole = render(conversation, tools=[WEATHER, ADD], chat_template=TEMPLATES[family], tokenize=False)
    assert whole.startswith(prompt)
    return whole[len(prompt):].removesuffix(END_OF_TURN[family])


def read_streamed(reader, text: str, piece_size: int) -> tuple[str, list[tuple[str, str]]]:
    """Feed `text` in pieces; the content and each call's (name, arguments) from the deltas,
    checking that a call's name comes first, with its id, and only once."""
    content, calls = "", {}
    pieces = [reader.feed(text[i:i + piece_size]) for i in range(0, len(text), piece_size)] + [reader.finish()]
    for parsed in pieces:
        content += parsed.content
        for delta in parsed.calls:
            if delta.name is not None:
                assert delta.index not in calls and delta.id.startswith("call_")
                calls[delta.index] = [delta.name, ""]
            calls[delta.index][1] += delta.arguments
    return content, [tuple(calls[i]) for i in sorted(calls)]


def decoded(calls: list[tuple[str, str]]) -> list[tuple[str, dict]]:
    return [(name, json.loads(arguments)) for name, arguments in calls]


@pytest.mark.parametrize("family", list(TEMPLATES))
@pytest.mark.parametrize("piece_size", [1, 3, 10_000])
def test_each_family_reads_what_its_template_writes(tokenizer, family, piece_size):
    calls = CALLS[:1] if family == "llama3_json" else CALLS  # Llama 3.1's template takes one call
    text = assistant_turn(tokenizer, family, calls)
    reader = ToolCallReader(FORMATS[family])
    content, streamed = read_streamed(reader, text, piece_size)
    assert content.strip() == ""
    assert decoded(streamed) == calls
    assert [(c.name, c.arguments) for c in reader.calls] == streamed


def test_mistral_reads_its_calls_without_the_special_marker(tokenizer):
    text = assistant_turn(tokenizer, "mistral", CALLS).removeprefix("[TOOL_CALLS]")
    assert decoded(read_streamed(ToolCallReader(FORMATS["mistral"]), text, 2)[1]) == CALLS


def test_hermes_content_before_the_calls_is_content(tokenizer):
    text = assistant_turn(tokenizer, "hermes", CALLS[:1], content="Let me look that up.")
    content, calls = read_streamed(ToolCallReader(FORMATS["hermes"]), text, 1)
    assert content == "Let me look that up." and decoded(calls) == CALLS[:1]


@pytest.mark.parametrize(("family", "text"), [
    ("hermes", "Just words, no calls: a <tool_c"),  # ends in what could have been a marker
    ("hermes", "<tool_call>\n{not json at all"),  # looked like a call but holds none
    ("llama3_json", 'Hello {"name": "x"}'),  # a Llama reply calls tools only from its start
    ("llama3_json", '{"answer": 42}'),  # JSON, but not a call
    ("mistral", "[1] is a citation"),
])
def test_text_without_calls_is_all_content(family, text):
    for piece_size in (1, len(text)):
        assert read_streamed(ToolCallReader(FORMATS[family]), text, piece_size) == (text, [])


def test_forced_formats_read_their_output():
    required = '[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert decoded(read_streamed(ToolCallReader(REQUIRED_FORMAT), required, 2)[1]) == [
        ("add", {"a": 1}), ("get_weather", {"city": "Oslo"})]
    assert read_streamed(NamedCallReader("add"), '{"a": 1}', 3) == ("", [("add", '{"a": 1}')])


def test_the_format_comes_from_the_template_then_the_model_type(tmp_path):
    assert format_for_model(tmp_path, TEMPLATES["mistral"]) is FORMATS["mistral"]
    assert format_for_model(tmp_path, TEMPLATES["hermes"]) is FORMATS["hermes"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert format_for_model(tmp_path, "{{ messages }}") is FORMATS["llama3_json"]


# -- the request ---------------------------------------------------------------------------


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[USER], **fields)


def refused(**fields) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as error:
        chat_request(**fields)
    return validation_problem(error.value.errors()[0])


def test_tool_choice_forces_a_schema_of_the_tools():
    required = chat_request(tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)
    functions = [WEATHER["function"], ADD["function"]]
    assert required.sampling(16, None).structured.json_schema == required_calls_schema(functions, parallel=False)
    named = chat_request(tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.sampling(16, None).structured.json_schema == ADD["function"]["parameters"]
    for choice in ("auto", "none", None):
        assert chat_request(tools=[WEATHER], tool_choice=choice).sampling(16, None).structured is None
    assert chat_request(tools=[WEATHER], tool_choice="none").template_tools() is None


def test_the_required_schema_admits_exactly_calls_of_the_tools():
    import jsonschema
    schema = required_calls_schema([WEATHER["function"], ADD["function"]], parallel=True)
    jsonschema.validate([{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather",
                                                                   "arguments": {"city": "x"}}], schema)
    for wrong in ([], [{"name": "nope", "arguments": {}}], [{"name": "get_weather", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"tool_choice": "required"}, "tool_choice", '"required" needs tools'),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice",
     "'add', which is not among tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "distinct function names"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters", 'Unsupported type "nonsense"'),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined with response_format"),
    ({"guided_regex": "a(b"}, "guided_regex", "the regular expression cannot be used"),
    ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ({"guided_grammar": "root ::= nothing"}, "guided_grammar", 'Rule "nothing" is not defined'),
    ({"guided_choice": []}, "guided_choice", "at least one string"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "cannot be combined with guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "the JSON schema cannot be used"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "[1]"}}]}]}, "messages[0].tool_calls[0].function.arguments", "JSON object"),
])
def test_bad_tools_and_constraints_are_refused_naming_the_parameter(fields, param, words):
    message, got_param = refused(**fields) if "messages" not in fields else _refused_body(fields)
    assert got_param == param and words in message, message


def _refused_body(fields: dict) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as error:
        ChatCompletionRequest(**fields)
    return validation_problem(error.value.errors()[0])


def test_history_with_tool_calls_reaches_the_template_as_hugging_face_expects(tokenizer):
    body = ChatCompletionRequest(tools=[WEATHER], messages=[
        USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call00001", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call00001", "content": "18 C and sunny"},
    ])
    prompt = tokenizer.apply_chat_template([m.for_template() for m in body.messages], tools=body.template_tools(),
                                           chat_template=TEMPLATES["hermes"], tokenize=False,
                                           add_generation_prompt=True)
    assert json.dumps(WEATHER, ensure_ascii=False) in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|im_start|>tool\n18 C and sunny" in prompt


# -- the OpenAI bodies -----------------------------------------------------------------------


def chunk(choices: list[dict]) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate(chunk_body("chatcmpl-1", "m", choices, None, chat=True))


def test_streamed_and_whole_answers_read_back_by_the_openai_client(tokenizer):
    text = assistant_turn(tokenizer, "hermes", CALLS, content="Checking.")
    whole = ChoiceState(0, text=text, finish_reason="stop", tool_calls=ToolCallReader(FORMATS["hermes"]))
    message, reason = _with_tool_calls(whole, whole.text)
    body = completion_body("chatcmpl-1", "m", [{"index": 0, "message": message, "logprobs": None,
                                                 "finish_reason": reason}], None, chat=True)
    completion = ChatCompletion.model_validate(body)

    stream = ChoiceState(0, tool_calls=ToolCallReader(FORMATS["hermes"]))
    state = ChatCompletionStreamState()
    state.handle_chunk(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]))
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        delta, reason = _tool_call_delta(stream, piece, "stop" if last else None)
        state.handle_chunk(chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]))
    streamed = state.get_final_completion()

    for answer in (completion, streamed):
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == CALLS
    assert [c.id for c in streamed.choices[0].message.tool_calls] == [c.id for c in stream.tool_calls.calls]


def test_an_answer_without_calls_stays_plain_content():
    choice = ChoiceState(0, text="no calls here", finish_reason="length", tool_calls=ToolCallReader(FORMATS["hermes"]))
    message, reason = _with_tool_calls(choice, choice.text)
    assert message == {"role": "assistant", "content": "no calls here"} and reason == "length"
    assert openai.types.chat.ChatCompletionMessage.model_validate(message).tool_calls is None


@pytest.mark.parametrize("parser,opening", [("qwen3", "<think>"), ("deepseek_r1", ""), ("deepseek_r1", "<think>")])
@pytest.mark.parametrize("piece_size", [1, 3, 8])
def test_thinking_is_told_apart_from_the_answer_and_its_calls(tokenizer, parser, opening, piece_size):
    """A reasoning model's output, whole and streamed in pieces that cut its tags: the thinking
    comes apart as reasoning_content, the answer's tool calls as before."""
    thinking = "The user asks for Paris; < then </thin and on."
    text = opening + thinking + "</think>\n\n" + assistant_turn(tokenizer, "hermes", CALLS, content="Checking.")

    def choice(**fields):
        return ChoiceState(0, tool_calls=ToolCallReader(FORMATS["hermes"]), reasoning=ReasoningSplitter(parser), **fields)

    message, reason = _chat_message(choice(text=text, finish_reason="stop"))
    assert message["reasoning_content"] == thinking and message["content"] == "\n\nChecking." and reason == "tool_calls"

    stream, state, reasoning = choice(), ChatCompletionStreamState(), ""
    state.handle_chunk(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]))
    pieces = [text[i:i + piece_size] for i in range(0, len(text), piece_size)]
    for i, piece in enumerate(pieces):
        delta, reason = _chat_delta(stream, SampleDelta(0, piece, [], None, "stop" if i == len(pieces) - 1 else None,
                                                     None))
        reasoning += delta.pop("reasoning_content", "")
        state.handle_chunk(chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]))
    streamed = state.get_final_completion().choices[0]
    assert reasoning == thinking and streamed.message.content == "\n\nChecking." and streamed.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed.message.tool_calls] == CALLS


@pytest.mark.parametrize("parser,text,expected", [
    ("qwen3", "Just an answer.", (None, "Just an answer.")),
    ("qwen3", "<thi", (None, "<thi")),
    ("qwen3", "  <think>unfinished", ("unfinished", None)),
    ("deepseek_r1", "thinking to the end", ("thinking to the end", None)),
    ("deepseek_r1", "done</think>", ("done", None)),
])
def test_outputs_with_and_without_a_closed_thinking_block(parser, text, expected):
    message, _ = _chat_message(ChoiceState(0, text=text, finish_reason="length", reasoning=ReasoningSplitter(parser)))
    assert (message["reasoning_content"], message["content"]) == expected
