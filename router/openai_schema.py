"""OpenAI-compatible request bodies (plus vLLM's sampling extras), validated by pydantic, and
pydantic's findings turned into messages a client can act on."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvserve.workers.protocol import SamplingParams


CACHE_SALT_MAX_CHARS = 256


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields both endpoints share; names follow OpenAI, extras follow vLLM."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=CACHE_SALT_MAX_CHARS)
    priority: int = Field(0, ge=-(2**31), lt=2**31)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("cache_salt")
    @classmethod
    def _printable_salt(cls, value):
        if value is not None and not value.isprintable():
            raise ValueError("cache_salt must hold printable characters only")
        return value

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
            "seed": self.seed,
            "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
        }
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return SamplingParams(**fields)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if value == "" or (isinstance(value, list) and (not value or "" in value)):
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one text or token list each."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    path = loc[1:] if loc[:1] == ["body"] else loc
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
