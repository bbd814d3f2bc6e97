"""Tool calls in generated text, read into OpenAI's `tool_calls`: each model family's format,
and the formats that `tool_choice: "required"` and a named function force on the output.

A reader takes the text as it streams in and hands back, per piece, the plain content that
is certain by now and what changed in each call: its name first (with its id), then its
arguments in fragments. Fed the whole text at once it gives the non-streamed answer; the
fragments of a call always join into the same arguments either way.

Formats (what each family's chat template shows the model, and what it writes back):
- `hermes` (Hermes, Qwen 2.5/3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, after optional content.
- `llama3_json` (Llama 3.1-3.3): the whole reply is `{"name": ..., "parameters": {...}}`,
  calls separated by `;`, optionally after `<|python_tag|>`.
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; `[TOOL_CALLS]` is a
  special token, so with `skip_special_tokens` the reply starts at the `[`.
"""

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

_WHITESPACE = " \t\r\n"
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class ToolCallFormat:
    """Where calls begin and what may stand between them. `markers` open the calls anywhere;
    `leading` only when the output starts with them (after whitespace). `fillers` are skipped
    around the calls' JSON objects."""

    name: str
    markers: tuple[str, ...]
    leading: tuple[str, ...]
    fillers: tuple[str, ...]


FORMATS = {
    "hermes": ToolCallFormat("hermes", ("<tool_call>",), (), ("<tool_call>", "</tool_call>")),
    "llama3_json": ToolCallFormat("llama3_json", (), ("<|python_tag|>", "{"), ("<|python_tag|>", ";")),
    "mistral": ToolCallFormat("mistral", ("[TOOL_CALLS]",), ("[",), ("[TOOL_CALLS]", "[", ",", "]")),
}
# What `tool_choice: "required"` makes the model write: a JSON array of calls (required_calls_schema).
REQUIRED_FORMAT = ToolCallFormat("required", (), ("[",), ("[", ",", "]"))


def required_calls_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema of REQUIRED_FORMAT for these tools (OpenAI `function` dicts): one call or
    more (exactly one unless `parallel`), each naming a tool and giving its parameters."""
    calls = [{"type": "object",
              "properties": {"name": {"const": tool["name"]},
                             "arguments": tool.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"]} for tool in tools]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    return schema if parallel else {**schema, "maxItems": 1}


def named_call_schema(tool: dict) -> dict:
    """A named function forces the output to be its arguments alone."""
    return tool.get("parameters") or {"type": "object"}


@dataclass
class CallDelta:
    """What one call gained in one piece: id and name when it first appears, then arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        delta: dict = {"index": self.index}
        if self.name is not None:
            delta.update(id=self.id, type="function")
        function = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        delta["function"] = function
        return delta


@dataclass
class Parsed:
    """A piece of output: content text, and the changes to calls."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    """Reads one choice's output in a ToolCallFormat, piece by piece (see the module's doc)."""

    def __init__(self, fmt: ToolCallFormat):
        self.format = fmt
        self.text = ""
        self.pos = 0  # what lies before it has been handed out as content or read as calls
        self.calls_start: int | None = None  # where the calls begin, once known
        self.calls: list[ToolCall] = []
        self._open_at: int | None = None  # where the call being read starts
        self._args_sent = 0  # characters of the open call's arguments handed out
        self._ended = False  # past the calls: the rest is neither content nor calls

    def feed(self, piece: str) -> Parsed:
        self.text += piece
        parsed = Parsed()
        if self.calls_start is None:
            parsed.content = self._content()
        if self.calls_start is not None and not self._ended:
            self._read_calls(parsed.calls)
        return parsed

    def finish(self) -> Parsed:
        """The end of the output: text held back as a possible marker is content after all, and
        so is text that looked like calls but held none."""
        if self.calls:
            return Parsed()
        start = self.pos if self.calls_start is None else self.calls_start
        self.pos = len(self.text)
        return Parsed(content=self.text[start:])

    # -- content before the calls ---------------------------------------------------------

    def _content(self) -> str:
        start = self._calls_start()
        if start is not None:
            self.calls_start = start
            end = max(self.pos, len(self.text[:start].rstrip(_WHITESPACE)))  # the calls' own separation
        else:
            end = len(self.text) - self._held_back()
        content, self.pos = self.text[self.pos:end], max(self.pos, end)
        return content

    def _calls_start(self) -> int | None:
        head = self.text.lstrip(_WHITESPACE)
        if any(head.startswith(lead) for lead in self.format.leading):
            return 0  # nothing was handed out yet: _held_back kept it all
        found = [i for i in (self.text.find(m, self.pos) for m in self.format.markers) if i >= 0]
        return min(found, default=None)

    def _held_back(self) -> int:
        """How much of the end of the text must wait: it may still become a marker, or be the
        whitespace before one."""
        head = self.text.lstrip(_WHITESPACE)
        if self.format.leading and any(lead.startswith(head) for lead in self.format.leading):
            return len(self.text)  # the output may still start with a leading marker
        tail = self.text[self.pos:]
        marker_part = max((n for m in self.format.markers for n in range(1, len(m))
                           if tail.endswith(m[:n])), default=0)
        before = tail[:len(tail) - marker_part]
        return marker_part + len(before) - len(before.rstrip(_WHITESPACE))

    # -- the calls ------------------------------------------------------------------------

    def _read_calls(self, deltas: list[CallDelta]) -> None:
        while not self._ended:
            at = self._skip_fillers(self.pos)
            if at is None:  # the text ends inside what may be a filler
                return
            self.pos = at
            if at == len(self.text):
                return
            if self.text[at] != "{":
                self._ended = True
                return
            scan = _scan_call(self.text, at)
            if scan.malformed or (scan.end is not None and scan.name is None):
                self._ended = True
                return
            self._emit(scan, deltas)
            if scan.end is None:
                return
            self.pos, self._args_sent = scan.end, 0

    def _skip_fillers(self, at: int) -> int | None:
        """Past whitespace and fillers from `at`; None while the text ends inside a filler."""
        longest = max(map(len, self.format.fillers), default=0)
        while at < len(self.text):
            if self.text[at] in _WHITESPACE:
                at += 1
                continue
            rest = self.text[at:at + longest]
            if any(len(f) > len(rest) and f.startswith(rest) for f in self.format.fillers):
                return None
            filler = max((f for f in self.format.fillers if rest.startswith(f)), key=len, default=None)
            if filler is None:
                return at
            at += len(filler)
        return at

    def _emit(self, scan: "_CallScan", deltas: list[CallDelta]) -> None:
        if scan.name is None:  # the name goes first: arguments wait for it
            return
        call = self._open_call(scan.name, deltas)
        arguments = scan.arguments_so_far(self.text)
        if arguments is not None and len(arguments) > self._args_sent:
            fragment = arguments[self._args_sent:]
            self._delta_of_open_call(deltas).arguments += fragment
            call.arguments += fragment
            self._args_sent = len(arguments)

    def _open_call(self, name: str, deltas: list[CallDelta]) -> ToolCall:
        """The call read from `self.pos`, announced (id and name) the first time it is seen."""
        if self.calls and self._open_at == self.pos:
            return self.calls[-1]
        call = ToolCall(_new_call_id(), name)
        self.calls.append(call)
        self._open_at = self.pos
        deltas.append(CallDelta(len(self.calls) - 1, call.id, name))
        return call

    def _delta_of_open_call(self, deltas: list[CallDelta]) -> CallDelta:
        index = len(self.calls) - 1
        if not deltas or deltas[-1].index != index:
            deltas.append(CallDelta(index))
        return deltas[-1]


class NamedCallReader:
    """A named `tool_choice`: the whole output is that function's arguments."""

    def __init__(self, name: str):
        self.calls = [ToolCall(_new_call_id(), name)]
        self._announced = False

    def feed(self, piece: str) -> Parsed:
        call = self.calls[0]
        call.arguments += piece
        delta = CallDelta(0, arguments=piece)
        if not self._announced:
            delta.id, delta.name, self._announced = call.id, call.name, True
        return Parsed(calls=[delta] if piece or delta.name else [])

    def finish(self) -> Parsed:
        return Parsed()


# -- scanning one call's JSON object --------------------------------------------------------


@dataclass
class _CallScan:
    """What is known of a call object so far: its name, where its arguments' value starts and
    ends, and where the object ends (None: not yet)."""

    name: str | None = None
    arguments_start: int | None = None
    arguments_end: int | None = None
    end: int | None = None
    malformed: bool = False

    def arguments_so_far(self, text: str) -> str | None:
        """The arguments' JSON text, complete or the part written so far; a string value (some
        models quote the object) only once complete, unquoted. "{}" for a finished call that
        has none."""
        if self.arguments_start is None:
            return "{}" if self.end is not None else None
        value = text[self.arguments_start:self.arguments_end]
        if value.startswith('"'):
            return json.loads(value) if self.arguments_end is not None else None
        return value


def _scan_call(text: str, start: int) -> _CallScan:
    scan = _CallScan()
    at = start + 1
    while True:
        at = _skip_space(text, at)
        if at == len(text):
            return scan
        if text[at] == "}":
            scan.end = at + 1
            return scan
        key_end = _value_end(text, at) if text[at] == '"' else -1
        if key_end == -1:
            scan.malformed = True
            return scan
        if key_end is None:
            return scan
        key = json.loads(text[at:key_end])
        at = _skip_space(text, key_end)
        if at == len(text):
            return scan
        if text[at] != ":":
            scan.malformed = True
            return scan
        value_start = _skip_space(text, at + 1)
        if value_start == len(text):
            return scan
        value_end = _value_end(text, value_start)
        if value_end == -1:
            scan.malformed = True
            return scan
        if key in _ARGUMENT_KEYS:
            scan.arguments_start, scan.arguments_end = value_start, value_end
        if value_end is None:
            return scan
        if key == "name":
            name = json.loads(text[value_start:value_end])
            scan.name = name if isinstance(name, str) else None
        at = _skip_space(text, value_end)
        if at < len(text) and text[at] == ",":
            at += 1
        elif at < len(text) and text[at] != "}":
            scan.malformed = True
            return scan


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _value_end(text: str, start: int) -> int | None:
    """Past the JSON value at `start`; None if the text ends inside it, -1 if it is not JSON."""
    opener = text[start]
    if opener == '"':
        return _string_end(text, start)
    if opener in "{[":
        return _container_end(text, start)
    at = start
    while at < len(text) and text[at] not in ",}] \t\r\n":
        at += 1
    if at == len(text):
        return None
    try:
        json.loads(text[start:at])
    except json.JSONDecodeError:
        return -1
    return at


def _string_end(text: str, start: int) -> int | None:
    at = start + 1
    while at < len(text):
        if text[at] == "\\":
            at += 2
        elif text[at] == '"':
            return at + 1
        else:
            at += 1
    return None


def _container_end(text: str, start: int) -> int | None:
    depth, at = 0, start
    while at < len(text):
        char = text[at]
        if char == '"':
            end = _string_end(text, at)
            if end is None:
                return None
            at = end
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return at + 1
        at += 1
    return None


# -- choosing a family's format ----------------------------------------------------------------

# Text in a chat template that tells which format the model was trained to write.
_TEMPLATE_SIGNS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3_json"))
_MODEL_TYPES = {"llama": "llama3_json", "mistral": "mistral", "mixtral": "mistral", "qwen2": "hermes",
                "qwen3": "hermes", "qwen2_moe": "hermes", "qwen3_moe": "hermes"}
DEFAULT_FORMAT = "hermes"


def format_for_model(model_dir: str | Path, chat_template: str | None) -> ToolCallFormat:
    """The format of a checkpoint: from its chat template's tool-call markers, else from the
    model type in its config.json, else DEFAULT_FORMAT."""
    for sign, name in _TEMPLATE_SIGNS:
        if chat_template and sign in chat_template:
            return FORMATS[name]
    config = Path(model_dir) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    return FORMATS[_MODEL_TYPES.get(model_type, DEFAULT_FORMAT)]
