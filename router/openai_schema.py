"""OpenAI-compatible request bodies (plus vLLM's sampling extras), validated by pydantic, and
pydantic's findings turned into messages a client can act on."""

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kvserve.router.tool_parsers import (
    REQUIRED_FORMAT, NamedCallReader, ToolCallFormat, ToolCallReader, named_call_schema, required_calls_schema,
)
from kvserve.workers.protocol import KVRetention, RetentionRange, SamplingParams, StructuredOutputSpec


CACHE_SALT_MAX_CHARS = 256


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, the usage so far in every chunk


def refusal(param: str, message: str) -> PydanticCustomError:
    """A problem a model validator finds with one parameter: reported with that parameter."""
    return PydanticCustomError("parameter_refused", "{message}", {"message": message, "param": param})


def structured_spec(param: str, fields: dict) -> StructuredOutputSpec:
    """The spec of `fields`; a refusal naming `param` if it cannot be used."""
    try:
        return StructuredOutputSpec(**fields)
    except ValidationError as error:
        problem = error.errors()[0]
        raise refusal(param, f"{param}: {problem['ctx']['error'] if 'ctx' in problem else problem['msg']}") from None


class JsonSchemaFormat(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`, the newer home of its `guided_*` fields: one of them."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def spec_fields(self) -> dict:
        fields = {"json_schema": self.json_, "json_object": self.json_object or None, "regex": self.regex,
                  "choice": self.choice, "grammar": self.grammar}
        return {name: value for name, value in fields.items() if value is not None}


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('response_format.json_schema is required with type "json_schema", and only then')
        return self

    def spec_fields(self) -> dict | None:
        if self.type == "json_schema":
            return {"json_schema": self.json_schema.schema_}
        return {"json_object": True} if self.type == "json_object" else None


class RetentionRangeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    start: int = Field(0, ge=0)
    end: int | None = Field(None, gt=0, description="exclusive; null: to the prompt's end")
    priority: int = Field(ge=0, le=100)
    duration_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _not_empty(self):
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"kv_retention range end ({self.end}) must be past its start ({self.start})")
        return self


class KVRetentionBody(BaseModel):
    """TensorRT-LLM's token-range retention: how long to keep which of the prompt's KV blocks."""

    model_config = ConfigDict(extra="forbid")

    ranges: list[RetentionRangeBody] = Field(default_factory=list, max_length=64)
    decode_priority: int = Field(35, ge=0, le=100)

    def retention(self) -> KVRetention:
        ranges = tuple(RetentionRange(r.start, r.end, r.priority, r.duration_s) for r in self.ranges)
        return KVRetention(ranges, self.decode_priority)


class _CacheFields(BaseModel):
    """Fields every endpoint that fills KV blocks takes: a tenant's cache salt, the request's
    priority (lower is served sooner) and vLLM's `truncate_prompt_tokens` (keep only the last
    that many tokens of each prompt)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cache_salt: str | None = Field(None, min_length=1, max_length=CACHE_SALT_MAX_CHARS)
    priority: int = Field(0, ge=-(2**31), lt=2**31)
    truncate_prompt_tokens: int | None = Field(None, ge=1)

    @field_validator("cache_salt")
    @classmethod
    def _printable_salt(cls, value):
        if value is not None and not value.isprintable():
            raise ValueError("cache_salt must hold printable characters only")
        return value


def _not_empty(value: str | list, param: str):
    if value == "" or (isinstance(value, list) and (not value or "" in value)):
        raise ValueError(f"{param} must not be empty")
    return value


def _one_or_many(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One text or token list, or a list of them, as a list."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


class _SamplingFields(_CacheFields):
    """Fields both generating endpoints share; names follow OpenAI, extras follow vLLM."""

    model: str | None = None
    n: int = Field(1, ge=1)  # the upper bound is the server's `serving.max_n`
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float = Field(1.0, gt=0)
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: each prompt token's, with this many top ones
    allowed_token_ids: list[int] | None = Field(None, min_length=1)  # vLLM's: the only tokens to generate
    bad_words: list[str] | None = None  # vLLM's: words not to generate
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None  # OpenAI's: token id -> bias
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name each token "token_id:<id>", not by its text
    kv_retention: KVRetentionBody | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    speculative: bool = True
    _structured: StructuredOutputSpec | None = PrivateAttr(None)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def _output_constraints(self) -> dict[str, dict]:
        """parameter -> the StructuredOutputSpec fields it asks for, for each one given."""
        constraints = {
            "response_format": self.response_format.spec_fields() if self.response_format else None,
            "guided_json": {"json_schema": self.guided_json} if self.guided_json is not None else None,
            "guided_regex": {"regex": self.guided_regex} if self.guided_regex is not None else None,
            "guided_choice": {"choice": self.guided_choice} if self.guided_choice is not None else None,
            "guided_grammar": {"grammar": self.guided_grammar} if self.guided_grammar is not None else None,
            "structured_outputs": self.structured_outputs.spec_fields() if self.structured_outputs else None,
        }
        return {param: fields for param, fields in constraints.items() if fields is not None}

    @model_validator(mode="after")
    def _one_output_constraint(self):
        constraints = self._output_constraints()
        if len(constraints) > 1:
            first, second = list(constraints)[:2]
            raise refusal(second, f"{second} cannot be combined with {first}: a request takes one output constraint")
        if constraints and self.allowed_token_ids is not None:
            raise refusal("allowed_token_ids", f"allowed_token_ids cannot be used with a structured output "
                                               f"({next(iter(constraints))}): the grammar may allow none of them")
        if self.bad_words and (constraints or self.allowed_token_ids is not None):
            other = next(iter(constraints), "allowed_token_ids")
            raise refusal("bad_words", f"bad_words cannot be used with {other}: together they may come to allow "
                                       "only banned tokens")
        for param, fields in constraints.items():
            self._structured = structured_spec(param, fields)
        return self

    def retention(self) -> KVRetention | None:
        return self.kv_retention.retention() if self.kv_retention is not None else None

    def scored_prompt_top(self) -> int | None:
        """How many most likely tokens the engine reports at each prompt position; None: it
        scores no prompt."""
        return self.prompt_logprobs

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's sampling parameters; raises pydantic's ValidationError on values the
        engine refuses."""
        fields = {
            "n": self.n,
            "max_tokens": max_tokens,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_p": self.min_p,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "stop": self.stop or [],
            "stop_token_ids": self.stop_token_ids or [],
            "logit_bias": self.logit_bias or None,
            "allowed_token_ids": self.allowed_token_ids,
            "bad_words": self.bad_words,
            "seed": self.seed,
            "logprobs": logprobs,
            "prompt_logprobs": self.scored_prompt_top(),
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "structured": self._structured,
            "speculative": self.speculative,
        }
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return SamplingParams(**fields)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def usage_in_every_chunk(self) -> bool:
        return self.include_usage_in_stream and self.stream_options.continuous_usage_stats


class CompletionRequest(_SamplingFields):
    """With `echo` each choice's text starts with its prompt, and with `logprobs` its logprobs
    start with the prompt's tokens (the first has none): what scoring a text needs, as
    lm-evaluation-harness does. `max_tokens` 0 (only with `echo`) generates nothing."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: None = None
    add_special_tokens: bool = True  # vLLM's: the tokenizer's own (a BOS) around a text prompt

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value):
        return _not_empty(value, "prompt")

    @model_validator(mode="after")
    def _nothing_generated_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise refusal("max_tokens", "max_tokens 0 generates nothing: it needs echo (to score the prompt)")
        return self

    @property
    def generates(self) -> bool:
        """Whether the choices hold generated tokens (`max_tokens` 0: the engine still makes the
        one that its prompt step samples, and it is dropped)."""
        return self.max_tokens != 0

    def scored_prompt_top(self) -> int | None:
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one text or token list each."""
        return _one_or_many(self.prompt)


class EmbeddingRequest(_CacheFields):
    """OpenAI's embeddings request. `dimensions` keeps the first that many components of each
    vector (normalised again when the server normalises)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value):
        return _not_empty(value, "input")

    def inputs(self) -> list[str | list[int]]:
        return _one_or_many(self.input)


def _texts(value: str | list[str], param: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts or "" in texts:
        raise refusal(param, f"{param} must hold non-empty texts")
    return texts


class ScoreRequest(_CacheFields):
    """vLLM's score API over the model's embeddings: the cosine similarity of each text of
    `text_1` with its counterpart in `text_2` (one text is set against every one of the other)."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]

    @model_validator(mode="after")
    def _paired(self):
        firsts, seconds = _texts(self.text_1, "text_1"), _texts(self.text_2, "text_2")
        if len(firsts) != len(seconds) and 1 not in (len(firsts), len(seconds)):
            raise refusal("text_2", f"text_1 holds {len(firsts)} texts and text_2 {len(seconds)}: give as many "
                                    "of each, or one to set against all of the other")
        return self

    def pairs(self) -> tuple[list[str], list[str]]:
        """The texts of each pair: one list and the other, the same length."""
        firsts, seconds = _texts(self.text_1, "text_1"), _texts(self.text_2, "text_2")
        return firsts * (len(seconds) if len(firsts) == 1 else 1), seconds * (len(firsts) if len(seconds) == 1 else 1)


class RerankRequest(_CacheFields):
    """vLLM's (and Jina's, Cohere's) rerank API over the model's embeddings: `documents` by the
    cosine similarity of their embedding with the query's, the `top_n` best (0: all)."""

    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str] = Field(min_length=1)
    top_n: int = Field(0, ge=0)

    @field_validator("documents")
    @classmethod
    def _documents_not_empty(cls, value):
        return _texts(value, "documents")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("a tool call's function.arguments must be a JSON object, as text")
        return value


class AssistantToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as Hugging Face chat templates read it: tool-call arguments as a dict."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.role == "tool" and self.name is not None:
            message["name"] = self.name
        return message


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


# apply_chat_template's own arguments, which chat_template_kwargs may not set.
_TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class _ChatTemplateFields(BaseModel):
    """How the messages go through the model's chat template (vLLM's names):
    `continue_final_message` leaves the last (assistant) message open for the model to go on
    with; `chat_template_kwargs` are more variables for the template, e.g. Qwen3's
    `enable_thinking`. OpenAI's `reasoning_effort` is the template variable of that name (as
    gpt-oss's template reads it), unless `chat_template_kwargs` sets it; a template that does
    not read it ignores it."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None

    @model_validator(mode="after")
    def _template_options_agree(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise refusal("continue_final_message", "continue_final_message needs add_generation_prompt set to "
                                                    "false: the final message is continued, no new one opened")
        taken = sorted(_TEMPLATE_ARGUMENTS & set(self.chat_template_kwargs or ()))
        if taken:
            raise refusal("chat_template_kwargs", f"chat_template_kwargs may not set {taken[0]!r}, an argument of "
                                                  "the template call itself")
        return self

    def template_options(self) -> dict[str, Any]:
        """The keyword arguments of `apply_chat_template` beside the messages and tools."""
        effort = {"reasoning_effort": self.reasoning_effort} if self.reasoning_effort is not None else {}
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message, **effort, **(self.chat_template_kwargs or {})}


class ChatCompletionRequest(_ChatTemplateFields, _SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_special_tokens: bool = False  # vLLM's: the template writes the special tokens itself
    thinking_token_budget: int | None = Field(None, ge=0)  # vLLM's: with serving.reasoning_parser

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _budget_can_end_the_thinking(self):
        if self.thinking_token_budget is not None and (self.allowed_token_ids is not None or self.bad_words):
            raise refusal("thinking_token_budget", "thinking_token_budget cannot be used with allowed_token_ids or "
                                                   "bad_words: they may ban the token that ends the thinking")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    # -- tools ---------------------------------------------------------------------------

    def _functions(self) -> list[dict]:
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools or []]

    def _forced_functions(self) -> list[dict]:
        """The functions the output must call: all of them for "required", the named one, or
        none. Refuses a tool_choice that names no given tool."""
        functions = self._functions()
        names = [f["name"] for f in functions]
        if len(set(names)) != len(names):
            raise refusal("tools", "tools must have distinct function names")
        if self.tool_choice == "required":
            if not functions:
                raise refusal("tool_choice", 'tool_choice "required" needs tools')
            return functions
        if isinstance(self.tool_choice, NamedToolChoice):
            chosen = [f for f in functions if f["name"] == self.tool_choice.function.name]
            if not chosen:
                raise refusal("tool_choice", f"tool_choice names the function {self.tool_choice.function.name!r}, "
                                             "which is not among tools")
            return chosen
        return []

    def _output_constraints(self) -> dict[str, dict]:
        constraints = super()._output_constraints()
        forced = self._forced_functions()
        for i, function in enumerate(self._functions()):
            if function in forced and "parameters" in function:
                structured_spec(f"tools[{i}].function.parameters", {"json_schema": function["parameters"]})
        if self.tool_choice == "required":
            constraints["tool_choice"] = {"json_schema": required_calls_schema(forced, self.parallel_tool_calls)}
        elif forced:
            constraints["tool_choice"] = {"json_schema": named_call_schema(forced[0])}
        return constraints

    def template_tools(self) -> list[dict] | None:
        """The tools as `apply_chat_template(tools=...)` takes them; none for tool_choice "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def tool_call_reader(self, family: ToolCallFormat) -> Callable[[], ToolCallReader | NamedCallReader] | None:
        """How to read the tool calls out of each choice's text: in the model family's format,
        or in the format tool_choice forces; None when the output holds no calls."""
        if self.template_tools() is None:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return lambda: NamedCallReader(self.tool_choice.function.name)
        chosen = REQUIRED_FORMAT if self.tool_choice == "required" else family
        return lambda: ToolCallReader(chosen)


# -- pydantic's findings as messages -----------------------------------------------------

# What a field that accepts several shapes takes, for a value that fits none of them.
_UNION_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}
_COMPARISONS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
                "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}
_BODY_NOT_OBJECT = {"model_attributes_type", "model_type", "dict_type"}


def _is_union_tag(part: Any) -> bool:
    """Pydantic names the member of a union it tried in the location: `str`, `list[int]`..."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def _param(path: list) -> str | None:
    """OpenAI's spelling of a location: `messages[0].role`."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or None


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def validation_problem(error: dict) -> tuple[str, str | None]:
    """(message, param) for one of pydantic's errors of a request body."""
    kind, ctx = error["type"], error.get("ctx") or {}
    loc = list(error.get("loc", ()))
    if kind == "parameter_refused":
        return ctx["message"], ctx["param"]
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    path = loc[1:] if loc[:1] == ["body"] else loc
    if path[-1:] == ["[key]"] and len(path) >= 2:  # a key of a mapping (logit_bias's token ids)
        param = _param(path[:-2])
        return f"{param} must map token ids to numbers; {path[-2]!r} is not a token id", param
    union_at = next((i for i, part in enumerate(path) if _is_union_tag(part)), None)
    if union_at is not None:
        param = _param(path[:union_at])
        return f"{param} must be {_UNION_SHAPES.get(path[union_at - 1], 'of another type')}", param
    param = _param(path)
    text = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if param is None:
        if kind in _BODY_NOT_OBJECT:
            return "the request body must be a JSON object", None
        if kind == "missing":
            return "the request body is empty: send a JSON object", None
        return text, None
    return _field_message(kind, ctx, param, text), param


def _field_message(kind: str, ctx: dict, param: str, text: str) -> str:
    if kind == "missing":
        return f"{param} is required"
    if kind == "extra_forbidden":
        return f"{param} is not a known parameter"
    if kind in _COMPARISONS:
        key, sign = _COMPARISONS[kind]
        return f"{param} must be {sign} {_number(ctx[key])}"
    if kind == "literal_error":
        return f"{param} must be {ctx['expected']}"
    if kind == "finite_number":
        return f"{param} must be a finite number"
    if kind == "string_too_short":
        return f"{param} must not be empty" if ctx.get("min_length") == 1 else \
            f"{param} must be at least {ctx['min_length']} characters long"
    if kind == "string_too_long":
        return f"{param} must be at most {ctx['max_length']} characters long"
    if kind == "too_short":
        return f"{param} must not be empty" if ctx.get("min_length") == 1 else \
            f"{param} must have at least {ctx['min_length']} items"
    if kind == "too_long":
        return f"{param} must have at most {ctx['max_length']} items"
    if kind == "value_error":  # our validators' messages name the parameter themselves
        return text
    if text.startswith("Input should be"):  # "Input should be a valid integer, unable to parse..."
        return f"{param} must be" + text.removeprefix("Input should be").split(",")[0]
    return f"{param}: {text}"


class TokenizeRequest(_ChatTemplateFields):
    """vLLM's `/tokenize` body: a `prompt`, or chat `messages` put through the model's chat
    template (`add_special_tokens` then defaults to false, as for a chat completion)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give one of prompt and messages")
        chat_only = {"tools", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                     "reasoning_effort"}
        if self.prompt is not None and chat_only & self.model_fields_set:
            raise ValueError(f"{', '.join(sorted(chat_only))} go with messages, not prompt")
        return self

    def template_tools(self) -> list[dict] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def special_tokens(self) -> bool:
        return self.add_special_tokens if self.add_special_tokens is not None else self.messages is None


class DetokenizeRequest(BaseModel):
    """vLLM's `/detokenize` body."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's `/v1/load_lora_adapter` body; `model` names the base model when several serve
    adapters."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    model: str | None = None


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's `/v1/unload_lora_adapter` body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
