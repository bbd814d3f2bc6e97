"""Structured outputs on their own: specs, their compile cache, matchers and the batched logits
mask. Random logits stand in for a model that writes gibberish; under the mask every output
must still be what its spec asks for."""

import ast
import json
import pickle
import re
import threading

import jsonschema
import pytest
import torch
from pydantic import ValidationError

from kvserve.cluster.tiny_model import build_tokenizer
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.structured_output import (
    GrammarCompiler, StructuredMatcher, apply_token_bitmask, fill_bitmask_rows, new_bitmask,
)
from kvserve.workers.engine.structured_spec import StructuredOutputError, StructuredOutputSpec

MODEL_VOCAB = 520  # wider than the tokenizer's 512, as a model's padded embedding often is
MAX_STEPS = 20_000

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
            "required": ["city", "zip"],
        },
        "friends": {
            "type": "array",
            "items": {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
                      "required": ["id", "ok"]},
            "maxItems": 3,
        },
        "nickname": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "score", "role", "tags", "address", "friends"],
}

ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor ("*" factor)*
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]*
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    compiler = GrammarCompiler(tokenizer, MODEL_VOCAB, [tokenizer.eos_token_id])
    yield compiler
    compiler.shutdown()


def generate_batch(compiler, tokenizer, specs: list[StructuredOutputSpec], seed: int) -> list[str]:
    """One output per spec, all sampled together as one batch from random logits under the
    batch's mask, until each row's matcher ends; row 0 is unconstrained throughout."""
    matchers = {row: StructuredMatcher(compiler.compile(spec).result()) for row, spec in enumerate(specs, start=1)}
    tokens: dict[int, list[int]] = {row: [] for row in matchers}
    bitmask = new_bitmask(len(specs) + 1, MODEL_VOCAB)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(MAX_STEPS):
        live = [(row, m) for row, m in matchers.items() if not m.is_terminated()]
        if not live:
            break
        logits = torch.randn(len(specs) + 1, MODEL_VOCAB, generator=generator) * 4
        unmasked_row = logits[0].clone()
        assert fill_bitmask_rows(bitmask, live) >= 0
        apply_token_bitmask(logits, bitmask, [row for row, _ in live])
        assert torch.equal(logits[0], unmasked_row)
        for row, matcher in live:
            token = int(torch.multinomial(logits[row].softmax(-1), 1, generator=generator))
            assert matcher.accept(token)
            tokens[row].append(token)
    else:
        pytest.fail(f"a matcher did not terminate within {MAX_STEPS} steps")
    for row_tokens in tokens.values():
        assert row_tokens[-1] == tokenizer.eos_token_id  # a complete output ends with a stop token
    return [tokenizer.decode(tokens[row][:-1]) for row in sorted(tokens)]


def test_json_schema_outputs_parse_and_validate(compiler, tokenizer):
    spec = StructuredOutputSpec(json_schema=PERSON)
    for seed in range(3):
        for text in generate_batch(compiler, tokenizer, [spec] * 4, seed):
            jsonschema.validate(json.loads(text), PERSON)


def test_json_schema_given_as_text_and_json_object(compiler, tokenizer):
    as_text = StructuredOutputSpec(json_schema=json.dumps(PERSON))
    assert as_text.key() == StructuredOutputSpec(json_schema=PERSON).key()
    outputs = generate_batch(compiler, tokenizer, [as_text, StructuredOutputSpec(json_object=True)] * 2, seed=7)
    for text in outputs[::2]:
        jsonschema.validate(json.loads(text), PERSON)
    for text in outputs[1::2]:
        assert isinstance(json.loads(text), dict)


def test_regex_choice_and_grammar_outputs_match(compiler, tokenizer):
    pattern = r"[a-z]{2,6}-\d{3}(\.[A-Z]+)?"
    choices = ['say "yes"', "back\\slash", "line\nbreak", "café ☕", "no"]
    specs = [StructuredOutputSpec(regex=pattern), StructuredOutputSpec(choice=choices),
             StructuredOutputSpec(grammar=ARITHMETIC)]
    for seed in range(4):
        word, chosen, expression = generate_batch(compiler, tokenizer, specs, seed)
        assert re.fullmatch(pattern, word)
        assert chosen in choices
        assert _is_arithmetic(expression), expression


def _is_arithmetic(text: str) -> bool:
    """Whether `text` is an expression of ARITHMETIC: whole numbers, + - * and parentheses."""
    allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Constant)
    nodes = list(ast.walk(ast.parse(text, mode="eval")))
    return all(isinstance(n, allowed) for n in nodes) and " " not in text


def test_matcher_refuses_tokens_outside_the_grammar_and_rolls_back(compiler, tokenizer):
    matcher = StructuredMatcher(compiler.compile(StructuredOutputSpec(choice=["yes", "no"])).result())
    yes = tokenizer.encode("yes", add_special_tokens=False)
    no = tokenizer.encode("no", add_special_tokens=False)
    assert not matcher.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    assert not matcher.accept(tokenizer.eos_token_id)  # nothing chosen yet
    assert all(matcher.accept(t) for t in yes)
    assert matcher.accept(tokenizer.eos_token_id) and matcher.is_terminated()
    matcher.rollback(len(yes) + 1)
    assert not matcher.is_terminated()
    assert all(matcher.accept(t) for t in no) and matcher.accept(tokenizer.eos_token_id)


def test_bitmask_allows_exactly_the_grammar_next_tokens(compiler, tokenizer):
    matcher = StructuredMatcher(compiler.compile(StructuredOutputSpec(regex="[0-9]+")).result())
    bitmask = new_bitmask(2, MODEL_VOCAB)
    fill_bitmask_rows(bitmask, [(1, matcher)])
    logits = torch.zeros(2, MODEL_VOCAB)
    apply_token_bitmask(logits, bitmask, [1])
    allowed = set(torch.nonzero(logits[1] == 0).flatten().tolist())
    digits_only = {t for t in range(len(tokenizer)) if re.fullmatch("[0-9]+", tokenizer.decode([t]))}
    assert allowed == digits_only
    assert torch.all(logits[0] == 0)  # a row not listed is left alone
    assert torch.all(logits[1, len(tokenizer):] == float("-inf"))  # padding ids beyond the tokenizer


@pytest.mark.parametrize("opener", [31, 32, 95])  # the last bit of a 32-bit word, the first, a middle word's last
def test_an_output_that_may_open_a_thinking_allows_its_opening_token_first(compiler, tokenizer, opener):
    """An undecided matcher (`opened_by_token_id`) allows the grammar's first tokens and the
    opening token; after the opening token it waits for the end token, after any other first
    token the grammar holds."""
    digits = {t for t in range(len(tokenizer)) if re.fullmatch("[0-9]+", tokenizer.decode([t]))}
    end = next(t for t in range(len(tokenizer)) if t not in digits and t != opener)
    assert opener not in digits
    spec = StructuredOutputSpec(regex="[0-9]+", after_token_id=end, opened_by_token_id=opener)
    compiled = compiler.compile(spec).result()
    matcher = StructuredMatcher.for_spec(compiled, spec)
    bitmask = new_bitmask(1, MODEL_VOCAB)
    fill_bitmask_rows(bitmask, [(0, matcher)])
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_token_bitmask(logits, bitmask, [0])
    assert set(torch.nonzero(logits[0] == 0).flatten().tolist()) == digits | {opener}
    assert matcher.accept(opener) and not matcher.active
    x = tokenizer.encode("x", add_special_tokens=False)[0]
    assert matcher.accept(x) and matcher.accept(end) and matcher.active and not matcher.accept(x)
    answering = StructuredMatcher.for_spec(compiled, spec)
    assert answering.accept(min(digits)) and answering.active and not answering.accept(opener)


def test_compile_cache_is_keyed_by_spec_bounded_and_off_thread(tokenizer):
    compiler = GrammarCompiler(tokenizer, MODEL_VOCAB, [tokenizer.eos_token_id], cache_size=2)
    try:
        first = compiler.compile(StructuredOutputSpec(regex="a+"))
        assert compiler.compile(StructuredOutputSpec(regex="a+")) is first
        compiler.compile(StructuredOutputSpec(regex="b+"))
        compiler.compile(StructuredOutputSpec(regex="a+"))  # a+ is now the most recent
        compiler.compile(StructuredOutputSpec(regex="c+"))  # evicts b+
        assert compiler.compile(StructuredOutputSpec(regex="a+")) is first
        compiled = first.result(timeout=30)
        assert compiled.compile_s > 0
        threads = {t.name for t in threading.enumerate()}
        assert any(name.startswith("grammar-compile") for name in threads)
    finally:
        compiler.shutdown()


@pytest.mark.parametrize(("fields", "problem"), [
    ({"regex": "a(b"}, "the regular expression cannot be used: Regex parsing error at position 4"),
    ({"json_schema": {"type": "nonsense"}}, 'the JSON schema cannot be used: Unsupported type "nonsense"'),
    ({"json_schema": "{not json"}, "the JSON schema is not valid JSON"),
    ({"grammar": "root ::= missing"}, 'the EBNF grammar cannot be used: EBNF parser error at line 1, column 10: '
                                       'Rule "missing" is not defined'),
    ({"choice": []}, "choice must hold at least one string"),
    ({}, "exactly one of json_schema, json_object, regex, choice, grammar; got none"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"regex": "a", "opened_by_token_id": 5}, "opened_by_token_id needs after_token_id"),
])
def test_a_spec_that_cannot_compile_is_refused_with_its_reason(fields, problem):
    with pytest.raises(ValidationError) as refused:
        SamplingParams(structured=fields)
    error = refused.value.errors()[0]
    assert isinstance(error["ctx"]["error"], StructuredOutputError)
    assert problem in error["msg"] and ".cc:" not in error["msg"]


def test_sampling_params_carry_the_spec_across_processes():
    params = SamplingParams(structured={"json_schema": PERSON}, n=2)
    copy = pickle.loads(pickle.dumps(params))
    assert copy == params and copy.structured.key() == params.structured.key()
