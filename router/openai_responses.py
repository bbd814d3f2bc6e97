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

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator

from kvserve.router.errors import OpenAIError
from kvserve.router.openai_schema import ChatCompletionRequest


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
                                  "user": self.user, "model": self.model, "seed": self.seed}
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
            "reasoning": None,
        }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(chat_usage: dict | None, reasoning_text: str, token_count) -> dict | None:
    if chat_usage is None:
        return None
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": token_count(reasoning_text) if reasoning_text else 0},
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
        message = choice["message"]
        output = []
        reasoning = message.get("reasoning_content") or ""
        if reasoning:
            output.append(_reasoning_item(_new_id("rs"), reasoning, "completed"))
        if message.get("content") or not (message.get("tool_calls") or reasoning):
            output.append(_message_item(_new_id("msg"), message.get("content") or "", "completed"))
        for call in message.get("tool_calls") or []:
            output.append(_call_item(_new_id("fc"), call["id"], call["function"]["name"],
                                     call["function"]["arguments"], "completed"))
        usage = _usage(completion.get("usage"), reasoning, self.token_count)
        return self.response("completed", output, usage, choice["finish_reason"])

    async def events(self, chunks: AsyncIterator[dict],
                     keep: Callable[[dict], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
        """The Responses stream events of a chat stream, as server-sent events; `keep` gets
        the completed response (to store it) before its last event goes out."""
        stream = _EventStream(self)
        yield stream.emit("response.created", response=self.response("in_progress", []))
        yield stream.emit("response.in_progress", response=self.response("in_progress", []))
        try:
            async for chunk in chunks:
                for event in stream.chunk(chunk):
                    yield event
        except OpenAIError as error:
            for event in stream.close_item():
                yield event
            failure = {"code": error.code or error.type, "message": error.message}
            yield stream.emit("response.failed", response=self.response("failed", stream.output, error=failure))
            return
        for event in stream.finish():
            yield event
        usage = _usage(stream.usage, stream.reasoning, self.token_count)
        response = self.response("completed", stream.output, usage, stream.finish_reason)
        if keep is not None:
            await keep(response)
        yield stream.emit("response.completed", response=response)


class _EventStream:
    """The state of one streamed response: the output items so far, the one open now."""

    def __init__(self, builder: ResponseBuilder):
        self.builder = builder
        self.sequence = 0
        self.output: list[dict] = []
        self.open: dict | None = None  # the item being filled
        self.open_call: int | None = None  # the chat tool call index of an open function call
        self.reasoning = ""
        self.usage: dict | None = None
        self.finish_reason: str | None = None

    def emit(self, kind: str, **fields) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()

    def chunk(self, chunk: dict) -> list[bytes]:
        events = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                events += self._text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                events += self._text("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice["finish_reason"] is not None:
                self.finish_reason = choice["finish_reason"]
        return events

    def _text(self, kind: str, piece: str) -> list[bytes]:
        events = [] if self.open is not None and self.open["type"] == kind else self._start(kind)
        item, where = self.open, {"item_id": self.open["id"], "output_index": len(self.output) - 1, "content_index": 0}
        item["content"][0]["text"] += piece
        if kind == "reasoning":
            self.reasoning += piece
            return events + [self.emit("response.reasoning_text.delta", **where, delta=piece)]
        return events + [self.emit("response.output_text.delta", **where, delta=piece, logprobs=[])]

    def _start(self, kind: str) -> list[bytes]:
        """Close the open item and open a reasoning item or a message, its one part empty."""
        events = self.close_item()
        make = _reasoning_item if kind == "reasoning" else _message_item
        item = self.open = make(_new_id("rs" if kind == "reasoning" else "msg"), "", "in_progress")
        self.output.append(item)
        index = len(self.output) - 1
        events.append(self.emit("response.output_item.added", output_index=index, item={**item, "content": []}))
        events.append(self.emit("response.content_part.added", item_id=item["id"], output_index=index,
                                content_index=0, part=item["content"][0]))
        return events

    def finish(self) -> list[bytes]:
        """The events that close the output: the open item, or an empty message if there was none."""
        return self.close_item() if self.output else self._start("message") + self.close_item()

    def _call(self, call: dict) -> list[bytes]:
        events = []
        if call.get("id") is not None and call["index"] != self.open_call:
            events += self.close_item()
            item = _call_item(_new_id("fc"), call["id"], call["function"]["name"], "", "in_progress")
            self.output.append(item)
            self.open, self.open_call = item, call["index"]
            events.append(self.emit("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        piece = call["function"].get("arguments") or ""
        if piece and self.open is not None and self.open["type"] == "function_call":
            self.open["arguments"] += piece
            events.append(self.emit("response.function_call_arguments.delta", item_id=self.open["id"],
                                    output_index=len(self.output) - 1, delta=piece))
        return events

    def close_item(self) -> list[bytes]:
        """The events that finish the open item, if any."""
        item, self.open, self.open_call = self.open, None, None
        if item is None:
            return []
        index, events = len(self.output) - 1, []
        item["status"] = "completed"
        if item["type"] == "function_call":
            events.append(self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                    arguments=item["arguments"]))
        else:
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if item["type"] == "reasoning":
                events.append(self.emit("response.reasoning_text.done", **where, text=part["text"]))
            else:
                events.append(self.emit("response.output_text.done", **where, text=part["text"], logprobs=[]))
            events.append(self.emit("response.content_part.done", **where, part=part))
        events.append(self.emit("response.output_item.done", output_index=index, item=item))
        return events


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}
