"""Anthropic's Messages API (`POST /v1/messages`) on the chat completions path, for clients
written against it.

A request becomes a chat request: `system` the system message, each message's text blocks
its content, `tool_use` blocks an assistant's tool calls and `tool_result` blocks tool
messages (thinking blocks are left out, as chat templates leave out earlier thinking), the
tools function tools and `tool_choice` its chat counterpart ("any": "required"). The chat
result becomes a message whose content holds a thinking block (with a reasoning parser), a
text block and the tool_use blocks; a chat stream becomes the Messages stream events.
"""

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from kvserve.router.chat_stream import Block, ChatStreamReader, Closed, Grew, Opened, message_blocks, typed_event
from kvserve.router.errors import OpenAIError
from kvserve.router.openai_schema import ChatCompletionRequest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(block.text for block in self.content)


class ThinkingBlock(_Strict):
    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")] | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")] | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[ThinkingBlock, Tag("redacted_thinking")],
    Discriminator(lambda block: block.get("type") if isinstance(block, dict) else getattr(block, "type", None),
                  custom_error_type="content_block_type", custom_error_message=(
                      "a content block's type must be 'text', 'tool_use', 'tool_result' or 'thinking'")),
]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    def blocks(self) -> list:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class Tool(_Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Strict):
    """Whether the model thinks first: the chat template's `enable_thinking` (Qwen3's name);
    `budget_tokens` is chat's `thinking_token_budget` (with `serving.reasoning_parser`)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class JSONOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    """`effort` goes to the chat template as `reasoning_effort`; `format` is a structured output."""

    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JSONOutputFormat | None = None


class MessagesRequest(_Strict):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here

    @model_validator(mode="after")
    def _budget_below_max_tokens(self):
        budget = self.thinking.budget_tokens if self.thinking else None
        if budget is not None and self.max_tokens is not None and budget >= self.max_tokens:
            raise ValueError(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({self.max_tokens})")
        return self

    def chat_request(self) -> ChatCompletionRequest:
        """The same request on the chat completions path."""
        fields: dict[str, Any] = {
            "model": self.model, "messages": self._messages(), "max_tokens": self.max_tokens, "stream": self.stream,
            "stop": self.stop_sequences, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
        }
        if self.stream:
            fields["stream_options"] = {"include_usage": True}
        if self.thinking is not None and self.thinking.type == "enabled":
            fields["thinking_token_budget"] = self.thinking.budget_tokens
        template_variables = self._template_variables()
        if template_variables:
            fields["chat_template_kwargs"] = template_variables
        output_format = self.output_config.format if self.output_config else None
        if output_format is not None:
            fields["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": output_format.schema_}}
        if self.tools:
            fields["tools"] = [{"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                                 "parameters": tool.input_schema}}
                               for tool in self.tools]
        choice = self.tool_choice
        if choice is not None:
            fields["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.type == "tool"
                                     else {"any": "required"}.get(choice.type, choice.type))
            if choice.disable_parallel_tool_use:
                fields["parallel_tool_calls"] = False
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})

    def _template_variables(self) -> dict[str, Any]:
        variables: dict[str, Any] = {}
        if self.thinking is not None:
            variables["enable_thinking"] = self.thinking.type != "disabled"
        if self.output_config is not None and self.output_config.effort is not None:
            variables["reasoning_effort"] = self.output_config.effort
        return variables

    def _messages(self) -> list[dict]:
        messages = []
        if self.system is not None:
            system = self.system if isinstance(self.system, str) else "".join(block.text for block in self.system)
            messages.append({"role": "system", "content": system})
        for message in self.messages:
            blocks = message.blocks()
            text = "".join(block.text for block in blocks if isinstance(block, TextBlock))
            if message.role == "assistant":
                calls = [{"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input)}}
                         for block in blocks if isinstance(block, ToolUseBlock)]
                messages.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
                continue
            messages += [{"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}
                         for block in blocks if isinstance(block, ToolResultBlock)]
            if text or not any(isinstance(block, ToolResultBlock) for block in blocks):
                messages.append({"role": "user", "content": text})
        return messages


class TokenCountRequest(MessagesRequest):
    """`POST /v1/messages/count_tokens`: a request's prompt, to count; nothing is generated."""

    max_tokens: int | None = Field(None, ge=1)


def _stop_reason(finish_reason: str | None, stop_reason: str | int | None) -> tuple[str | None, str | None]:
    """Anthropic's stop reason, and the stop sequence that ended the output if one did."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "tool_calls":
        return "tool_use", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return ("end_turn", None) if finish_reason is not None else (None, None)


def _usage(chat_usage: dict, output_tokens: int | None = None) -> dict:
    cached = chat_usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": chat_usage["prompt_tokens"] - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": chat_usage["completion_tokens"] if output_tokens is None else output_tokens}


def _content_block(block: Block, text: str | None = None) -> dict:
    """The content block of an output block, with its text (or `text`)."""
    text = block.text if text is None else text
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": text, "signature": ""}
    if block.kind == "text":
        return {"type": "text", "text": text}
    return {"type": "tool_use", "id": block.call_id, "name": block.name, "input": json.loads(text) if text else {}}


class MessageBuilder:
    """One message: from a whole chat completion, or as stream events from a chat stream's
    chunks. `prompt_usage` is the chat usage known before the first token."""

    def __init__(self, model: str, prompt_usage: dict):
        self.model = model
        self.id = f"msg_{uuid.uuid4().hex}"
        self.prompt_usage = prompt_usage

    def message(self, content: list[dict], usage: dict, stop: tuple[str | None, str | None]) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    def from_chat(self, completion: dict) -> dict:
        [choice] = completion["choices"]
        content = [_content_block(block) for block in message_blocks(choice["message"])]
        return self.message(content, _usage(completion["usage"]),
                            _stop_reason(choice["finish_reason"], choice.get("stop_reason")))

    async def events(self, chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        """The Messages stream events of a chat stream, as server-sent events."""
        reader, index, stop = ChatStreamReader(), -1, (None, None)
        yield _event("message_start", message=self.message([], _usage(self.prompt_usage, 0), (None, None)))
        try:
            async for chunk in chunks:
                for change in reader.read(chunk):
                    if isinstance(change, Opened):
                        index += 1
                        yield _event("content_block_start", index=index, content_block=_opened_block(change.block))
                    elif isinstance(change, Grew):
                        yield _event("content_block_delta", index=index, delta=_delta(change.block, change.piece))
                    else:
                        yield _event("content_block_stop", index=index)
                for choice in chunk["choices"]:
                    if choice["finish_reason"] is not None:
                        stop = _stop_reason(choice["finish_reason"], choice.get("stop_reason"))
        except OpenAIError as error:
            yield _event("error", error={"type": "api_error", "message": error.message})
            return
        for change in reader.close():
            if isinstance(change, Closed):
                yield _event("content_block_stop", index=index)
        usage = _usage(reader.usage or self.prompt_usage)
        yield _event("message_delta", delta={"stop_reason": stop[0], "stop_sequence": stop[1]},
                     usage={"output_tokens": usage["output_tokens"]})
        yield _event("message_stop")


def _opened_block(block: Block) -> dict:
    """A block as it starts: empty (a tool call's input comes in `input_json_delta`s)."""
    return _content_block(block, text="")


def _delta(block: Block, piece: str) -> dict:
    if block.kind == "reasoning":
        return {"type": "thinking_delta", "thinking": piece}
    if block.kind == "text":
        return {"type": "text_delta", "text": piece}
    return {"type": "input_json_delta", "partial_json": piece}


def _event(kind: str, **fields) -> bytes:
    return typed_event({"type": kind, **fields})
