"""OpenAI's Responses API (`POST /v1/responses`) on the chat completions path.

A request becomes a chat request: `instructions` the system message, the `input` items the
messages (a function call and its output become an assistant tool call and a tool message;
reasoning items are left out, as chat templates leave out earlier thinking), `text.format` the
response format, the flat function tools the chat ones. The chat result becomes a response
object whose output holds a reasoning item (with a reasoning parser), a message and the
function calls; a chat stream becomes the Responses stream events, each item opened, filled
by deltas and closed in turn.

A stored response (`store`, the default; `response_store.py`) keeps its conversation: a request
with `previous_response_id` runs on it, its own input after it (the earlier requests'
`instructions` are not carried over, as OpenAI's are not).
"""

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator

from kvserve.router.chat_stream import Block, Change, ChatStreamReader, Grew, Opened, message_blocks, typed_event
from kvserve.router.errors import OpenAIError
from kvserve.router.openai_schema import ChatCompletionRequest, ReasoningEffort


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class TextPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # of an output_text part sent back
    logprobs: list[Any] | None = None


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class ReasoningItem(_Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = Field(default_factory=list)
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: str | None = None


def _item_type(item: Any) -> str:
    """An input item's kind: its `type`, "message" when it has none (a bare role and content)."""
    return (item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")) or "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type, custom_error_type="input_item_type", custom_error_message=(
        "an input item's type must be 'message', 'function_call', 'function_call_output' or 'reasoning'")),
]


_ITEMS = TypeAdapter(list[InputItem])


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def response_format(self) -> dict | None:
        """The chat request's `response_format` for this format."""
        if self.type == "json_schema":
            fields = {"name": self.name, "schema": self.schema_, "description": self.description, "strict": self.strict}
            return {"type": "json_schema", "json_schema": {k: v for k, v in fields.items() if v is not None}}
        return {"type": "json_object"} if self.type == "json_object" else None


class TextConfig(_Strict):
    format: TextFormat | None = None


class ReasoningConfig(_Strict):
    """OpenAI's `reasoning`: `effort` as chat's `reasoning_effort`. A reasoning item holds the
    whole thinking as its text (no summary is written), whatever `summary` asks."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # summary's deprecated name


class ResponsesRequest(_Strict):
    model: str | None = None
    input: Annotated[list[InputItem], Field(min_length=1)]  # a text: one user message
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] = "disabled"
    seed: int | None = None  # as in chat completions (not OpenAI's: its Responses API has none)
    reasoning: ReasoningConfig | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_is_a_user_message(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    def chat_request(self, history: list[dict] = ()) -> ChatCompletionRequest:
        """The same request on the chat completions path, after the conversation `history`
        (the items of a stored response's, `conversation`)."""
        items = _ITEMS.validate_python(list(history)) + self.input
        fields: dict[str, Any] = {"messages": self._messages(items), "stream": self.stream,
                                  "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature,
                                  "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls,
                                  "user": self.user, "model": self.model, "seed": self.seed,
                                  "reasoning_effort": self.reasoning.effort if self.reasoning else None}
        if self.stream:
            fields["stream_options"] = {"include_usage": True}
        if self.tools:
            fields["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                               for tool in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            fields["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            fields["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            fields["response_format"] = self.text.format.response_format()
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})

    def conversation(self, history: list[dict], output: list[dict]) -> list[dict]:
        """The items of the conversation so far: `history`, this request's input, its `output`."""
        return [*history, *(item.model_dump(by_alias=True, exclude_none=True) for item in self.input), *output]

    def _messages(self, items: list[InputItem]) -> list[dict]:
        messages = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)  # calls made together
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return messages

    def echoed_settings(self) -> dict:
        """The request's settings as a response object repeats them."""
        tool_choice = self.tool_choice or "auto"
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "tools": [tool.model_dump(exclude_none=True) for tool in self.tools or []],
            "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
            "parallel_tool_calls": self.parallel_tool_calls, "metadata": self.metadata or {},
            "text": {"format": self.text.format.model_dump(by_alias=True, exclude_none=True)
                     if self.text and self.text.format else {"type": "text"}},
            "previous_response_id": self.previous_response_id, "store": self.store, "truncation": self.truncation, "user": self.user,
            "reasoning": self.reasoning.model_dump(exclude_none=True) if self.reasoning else None,
        }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(chat_usage: dict | None, reasoning_text: str, token_count) -> dict | None:
    """The response's usage from the chat's: its count of reasoning tokens, or where the
    vocabulary has no whole thinking tags to count them by, the thinking's text tokenized again."""
    if chat_usage is None:
        return None
    reasoning_tokens = chat_usage.get("completion_tokens_details", {}).get("reasoning_tokens")
    if reasoning_tokens is None:
        reasoning_tokens = token_count(reasoning_text) if reasoning_text else 0
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": chat_usage["total_tokens"],
    }


class ResponseBuilder:
    """One response: its object, from a whole chat completion or from a chat stream's chunks.
    `token_count` counts the tokens of a text (the reasoning's share of the output)."""

    def __init__(self, body: ResponsesRequest, model: str, token_count):
        self.body, self.model, self.token_count = body, model, token_count
        self.id = _new_id("resp")
        self.created_at = int(time.time())

    def response(self, status: str, output: list[dict], usage: dict | None = None,
                 finish_reason: str | None = None, error: dict | None = None) -> dict:
        incomplete = status == "completed" and finish_reason == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
            "status": "incomplete" if incomplete else status, "output": output, "usage": usage, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            **self.body.echoed_settings(),
        }

    def from_chat(self, completion: dict) -> dict:
        """The response to a whole chat completion (its one choice)."""
        [choice] = completion["choices"]
        blocks = message_blocks(choice["message"]) or [Block("text")]  # nothing at all: an empty message
        output = [_item(block, "completed") for block in blocks]
        usage = _usage(completion.get("usage"), _reasoning_text(blocks), self.token_count)
        return self.response("completed", output, usage, choice["finish_reason"])

    async def events(self, chunks: AsyncIterator[dict],
                     keep: Callable[[dict], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
        """The Responses stream events of a chat stream, as server-sent events; `keep` gets
        the completed response (to store it) before its last event goes out."""
        stream = _EventStream()
        yield stream.emit("response.created", response=self.response("in_progress", []))
        yield stream.emit("response.in_progress", response=self.response("in_progress", []))
        try:
            async for chunk in chunks:
                for event in stream.events(stream.reader.read(chunk)):
                    yield event
        except OpenAIError as error:
            for event in stream.events(stream.reader.close()):
                yield event
            failure = {"code": error.code or error.type, "message": error.message}
            yield stream.emit("response.failed", response=self.response("failed", stream.items, error=failure))
            return
        for event in stream.finish():
            yield event
        reader = stream.reader
        usage = _usage(reader.usage, _reasoning_text(reader.blocks), self.token_count)
        response = self.response("completed", stream.items, usage, reader.finish_reason)
        if keep is not None:
            await keep(response)
        yield stream.emit("response.completed", response=response)


class _EventStream:
    """One streamed response's events: the chat stream's blocks as output items, one open at
    a time (the last of `items`)."""

    def __init__(self):
        self.reader = ChatStreamReader()
        self.sequence = 0
        self.items: list[dict] = []

    def emit(self, kind: str, **fields) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return typed_event(event)

    def events(self, changes: list[Change]) -> list[bytes]:
        events = []
        for change in changes:
            if isinstance(change, Opened):
                events += self._opened(change.block)
            elif isinstance(change, Grew):
                events += self._grew(change.piece)
            else:
                events += self._closed()
        return events

    def finish(self) -> list[bytes]:
        """Close the open item, or send an empty message if the stream had no output at all."""
        if self.items:
            return self.events(self.reader.close())
        return self._opened(Block("text")) + self._closed()

    def _where(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _opened(self, block: Block) -> list[bytes]:
        item = _item(block, "in_progress", text="")  # its text comes in the deltas that follow
        self.items.append(item)
        if item["type"] == "function_call":
            return [self.emit("response.output_item.added", output_index=len(self.items) - 1, item=item)]
        return [self.emit("response.output_item.added", output_index=len(self.items) - 1, item={**item, "content": []}),
                self.emit("response.content_part.added", **self._where(), content_index=0, part=item["content"][0])]

    def _grew(self, piece: str) -> list[bytes]:
        item = self.items[-1]
        if item["type"] == "function_call":
            item["arguments"] += piece
            return [self.emit("response.function_call_arguments.delta", **self._where(), delta=piece)]
        item["content"][0]["text"] += piece
        if item["type"] == "reasoning":
            return [self.emit("response.reasoning_text.delta", **self._where(), content_index=0, delta=piece)]
        return [self.emit("response.output_text.delta", **self._where(), content_index=0, delta=piece, logprobs=[])]

    def _closed(self) -> list[bytes]:
        item, where, events = self.items[-1], self._where(), []
        item["status"] = "completed"
        if item["type"] == "function_call":
            events.append(self.emit("response.function_call_arguments.done", **where, arguments=item["arguments"]))
        else:
            part = item["content"][0]
            if item["type"] == "reasoning":
                events.append(self.emit("response.reasoning_text.done", **where, content_index=0, text=part["text"]))
            else:
                events.append(self.emit("response.output_text.done", **where, content_index=0, text=part["text"],
                                        logprobs=[]))
            events.append(self.emit("response.content_part.done", **where, content_index=0, part=part))
        events.append(self.emit("response.output_item.done", output_index=where["output_index"], item=item))
        return events


def _reasoning_text(blocks: list[Block]) -> str:
    return "".join(block.text for block in blocks if block.kind == "reasoning")


def _item(block: Block, status: str, text: str | None = None) -> dict:
    """The output item of a block, with its text (or `text`)."""
    text = block.text if text is None else text
    if block.kind == "reasoning":
        return _reasoning_item(_new_id("rs"), text, status)
    if block.kind == "text":
        return _message_item(_new_id("msg"), text, status)
    return _call_item(_new_id("fc"), block.call_id, block.name, text, status)


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}
