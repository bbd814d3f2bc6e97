"""What a request's output must look like: a JSON schema, any JSON object, a regular
expression, one of a list of strings, or an EBNF grammar. A spec is checked when it is built
(its grammar must convert), so an engine never receives one that cannot compile; `key` names
it for the compiled-grammar cache.

The grammar here is independent of any tokenizer; `structured_output.py` compiles it against
the model's vocabulary.
"""

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

if TYPE_CHECKING:
    import xgrammar

# xgrammar's errors start with "[12:00:00] /path/file.cc:123: " and may hold its check.
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")

# The spec's forms (its fields), with what an error message calls them.
_FORM_NAMES = {"json_schema": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
               "choice": "choice list", "grammar": "EBNF grammar"}
FORMS = tuple(_FORM_NAMES)


class StructuredOutputError(ValueError):
    """A spec whose grammar cannot be built; the message says what is wrong with it."""

    @classmethod
    def from_native(cls, what: str, error: Exception) -> "StructuredOutputError":
        """`what` cannot be used, for the reason xgrammar gave (without its source location)."""
        reason = _NATIVE_PREFIX.sub("", str(error).strip().splitlines()[0]).strip()
        return cls(f"the {what} cannot be used: {reason}")


class StructuredOutputSpec(BaseModel):
    """Exactly one form is set. `json_schema` arrives as a dict or as its JSON text. With
    `after_token_id` the output is free up to and including its first such token (the end of a
    reasoning model's thinking), and the grammar holds from the token after it. With
    `opened_by_token_id` as well, it waits so only if its first token is that one (the opening
    of a thinking the model may skip, Qwen3's): any other first token is the grammar's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF, as xgrammar reads it (GBNF: `root ::= ...`)
    after_token_id: int | None = None
    opened_by_token_id: int | None = None

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {error}") from None

    @model_validator(mode="after")
    def _one_form_that_converts(self) -> "StructuredOutputSpec":
        given = self._given_forms()
        if len(given) != 1:
            raise StructuredOutputError(f"a structured output spec takes exactly one of {', '.join(FORMS)}; "
                                        f"got {', '.join(given) or 'none'}")
        if self.choice is not None and not self.choice:
            raise StructuredOutputError("choice must hold at least one string")
        if self.opened_by_token_id is not None and self.after_token_id is None:
            raise StructuredOutputError("opened_by_token_id needs after_token_id: the token that ends what it opens")
        self.to_grammar()
        return self

    def _given_forms(self) -> list[str]:
        return [form for form in FORMS if getattr(self, form) not in (None, False)]

    @property
    def form(self) -> str:
        return self._given_forms()[0]

    @property
    def description(self) -> str:
        return _FORM_NAMES[self.form]

    def key(self) -> str:
        """A stable hash of the spec: equal specs share one compiled grammar."""
        canonical = json.dumps(self.model_dump(exclude={"after_token_id", "opened_by_token_id"}), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_grammar(self) -> "xgrammar.Grammar":
        """The tokenizer-independent grammar; StructuredOutputError if it cannot be built."""
        try:
            return self._build_grammar()
        except (RuntimeError, ValueError) as error:
            raise StructuredOutputError.from_native(self.description, error) from None

    def _build_grammar(self) -> "xgrammar.Grammar":
        import xgrammar  # here, not at the top: it loads torch, and most importers build no grammar

        # Compact JSON: free whitespace lets a model pad forever instead of finishing.
        if self.json_schema is not None:
            return xgrammar.Grammar.from_json_schema(json.dumps(self.json_schema), any_whitespace=False)
        if self.json_object:
            return xgrammar.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if self.regex is not None:
            return xgrammar.Grammar.from_regex(self.regex)
        if self.choice is not None:
            # A JSON string literal is also an EBNF one: the same quotes and escapes.
            literals = (json.dumps(choice, ensure_ascii=False) for choice in self.choice)
            return xgrammar.Grammar.from_ebnf("root ::= " + " | ".join(literals))
        return xgrammar.Grammar.from_ebnf(self.grammar)
