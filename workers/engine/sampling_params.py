"""Per-request sampling settings, with the names and defaults vLLM users know.

The sampler reads these fields for every row of every step. Pydantic v2 keeps field values
as plain instance attributes (no assignment validation, no `__getattr__` on the way), so a
read costs about what it costs on any Python object.
"""

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kvserve.workers.engine.structured_spec import StructuredOutputSpec

# Below this temperature a row takes the argmax: dividing the logits by it would overflow.
GREEDY_TEMPERATURE = 1e-5

# field -> (whether a value is valid, what the error message says it must be)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= -1, "-1 or 0 (off), or >= 1"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (lambda v: -(2**63) <= v < 2**63, "a signed 64-bit integer"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "max_tokens": (lambda v: v >= 1, ">= 1"),
    "min_tokens": (lambda v: v >= 0, ">= 0"),
    "stop": (lambda v: all(v), "non-empty strings"),
    "stop_token_ids": (lambda v: all(t >= 0 for t in v), "token ids >= 0"),
    "logprobs": (lambda v: 0 <= v <= 20, "in [0, 20]"),
    "prompt_logprobs": (lambda v: 0 <= v <= 20, "in [0, 20]"),
    "logit_bias": (lambda v: all(t >= 0 and -100 <= b <= 100 for t, b in v.items()),
                   "token ids >= 0, each with a bias in [-100, 100]"),
    "allowed_token_ids": (lambda v: len(v) > 0 and all(t >= 0 for t in v), "a non-empty list of token ids >= 0"),
    "bad_words": (lambda v: all(word.strip() for word in v), "words that are not blank"),
}


def _shown(value: Any) -> str:
    """-1.0 reads as -1, as the user most likely wrote it."""
    return f"{value:g}" if isinstance(value, float) else repr(value)


class ThinkingBudget(BaseModel):
    """A reasoning model's output opens with its thinking, which `end_token_id` ends: once
    `max_tokens` output tokens hold no such token, the next one is that token. With
    `opened_by_token_id` the output thinks only if its first token is that one (a thinking
    the model may skip), and the budget counts the tokens after it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    end_token_id: int = Field(ge=0)
    max_tokens: int = Field(ge=0)
    opened_by_token_id: int | None = Field(default=None, ge=0)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top tokens to report; 0: the sampled one only
    prompt_logprobs: int | None = None  # the same for every prompt token after the first; 0: its own only
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    allowed_token_ids: list[int] | None = None  # the only tokens it may generate
    bad_words: list[str] | None = None  # words it may not generate (as they tokenize, with a leading space or not)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured: StructuredOutputSpec | None = None  # the grammar every output must follow
    speculative: bool = True  # False: never verify proposed tokens, where the engine speculates
    thinking_budget: ThinkingBudget | None = None  # the output opens with thinking, at most this long

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(*_RULES)
    @classmethod
    def _within_rules(cls, value: Any, info: ValidationInfo) -> Any:
        valid, requirement = _RULES[info.field_name]
        if value is not None and not valid(value):
            raise ValueError(f"{info.field_name} must be {requirement}, got {_shown(value)}")
        return value

    @model_validator(mode="after")
    def _min_within_max(self) -> "SamplingParams":
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens}, "
                f"max_tokens={self.max_tokens}"
            )
        if self.structured is not None and self.min_tokens:
            # A complete output's grammar allows only the end tokens, which min_tokens masks.
            raise ValueError("min_tokens cannot be used with a structured output (response_format or guided_*)")
        if self.structured is not None and self.allowed_token_ids is not None:
            # The grammar may allow none of them at some point: the row would have nothing to draw.
            raise ValueError("allowed_token_ids cannot be used with a structured output (response_format or guided_*)")
        if self.bad_words and (self.structured is not None or self.allowed_token_ids is not None):
            # Either may come to allow only a banned token.
            raise ValueError("bad_words cannot be used with allowed_token_ids or a structured output "
                             "(response_format or guided_*)")
        if self.thinking_budget is not None and (self.bad_words or self.allowed_token_ids is not None):
            # Either may ban the token that ends the thinking when the budget forces it.
            raise ValueError("a thinking budget cannot be used with allowed_token_ids or bad_words")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def reads_tokens(self) -> bool:
        """Whether sampling reads the tokens so far (penalties count them; bad words look at
        the output's last ones; a thinking budget looks for the thinking's end)."""
        return self.uses_penalties or bool(self.bad_words) or self.thinking_budget is not None

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
