"""A chat completion read as output blocks: its thinking, its text, each tool call. A whole
completion's message gives its blocks at once (`message_blocks`); a stream's chunks open,
grow and close them one after another (`ChatStreamReader`). The Responses API and the Anthropic
Messages API build their outputs, and their stream events, from these.
"""

import json
from dataclasses import dataclass
from typing import Literal

BlockKind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Block:
    kind: BlockKind
    text: str = ""  # the text so far; a tool call's arguments (JSON) so far
    call_id: str | None = None  # a tool call's
    name: str | None = None  # the function a tool call calls


@dataclass
class Opened:
    """A block starts. Changes hold the live block: by the time one is read, the block may hold
    the text of the Grew changes after it, so its text is whole only at Closed."""

    block: Block


@dataclass
class Grew:
    block: Block
    piece: str  # the text (or a tool call's arguments) added


@dataclass
class Closed:
    block: Block


Change = Opened | Grew | Closed


def typed_event(event: dict) -> bytes:
    """A server-sent event named by its body's `type`, as both APIs stream them."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def message_blocks(message: dict) -> list[Block]:
    """The blocks of a whole chat completion's message (`generation._chat_message`'s)."""
    blocks = [Block("reasoning", message["reasoning_content"])] if message.get("reasoning_content") else []
    if message.get("content"):
        blocks.append(Block("text", message["content"]))
    for call in message.get("tool_calls") or []:
        blocks.append(Block("tool_call", call["function"]["arguments"], call["id"], call["function"]["name"]))
    return blocks


class ChatStreamReader:
    """The blocks of a chat stream (one choice) as its chunks come: every block it opened, in
    order, the changes each chunk makes, its usage and its finish reason."""

    def __init__(self):
        self.blocks: list[Block] = []
        self.open: Block | None = None
        self._open_call: int | None = None  # the chat tool call index of an open tool call
        self.usage: dict | None = None
        self.finish_reason: str | None = None

    def read(self, chunk: dict) -> list[Change]:
        changes: list[Change] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                changes += self._text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                changes += self._text("text", delta["content"])
            for call in delta.get("tool_calls") or []:
                changes += self._call(call)
            if choice["finish_reason"] is not None:
                self.finish_reason = choice["finish_reason"]
        return changes

    def close(self) -> list[Change]:
        """Close the open block, if any."""
        block, self.open, self._open_call = self.open, None, None
        return [Closed(block)] if block is not None else []

    def _open(self, block: Block) -> list[Change]:
        changes = self.close()
        self.blocks.append(block)
        self.open = block
        return changes + [Opened(block)]

    def _text(self, kind: BlockKind, piece: str) -> list[Change]:
        changes = [] if self.open is not None and self.open.kind == kind else self._open(Block(kind))
        self.open.text += piece
        return changes + [Grew(self.open, piece)]

    def _call(self, call: dict) -> list[Change]:
        """A chat tool call delta: its first names the call (id, function), the rest add arguments."""
        changes = []
        if call.get("id") is not None and call["index"] != self._open_call:
            changes = self._open(Block("tool_call", call_id=call["id"], name=call["function"]["name"]))
            self._open_call = call["index"]
        piece = call["function"].get("arguments") or ""
        if piece and self.open is not None and self.open.kind == "tool_call":
            self.open.text += piece
            changes.append(Grew(self.open, piece))
        return changes
