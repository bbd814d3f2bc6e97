"""Structured outputs through the whole engine: a random-weight model writes gibberish on its
own, yet every output under a grammar is what the grammar asks for, with n > 1, seeds, logprobs,
stop strings, prefix caching and preemption in play."""

import json
import re

import jsonschema
import pytest

from kvserve.workers.engine.sampling_params import SamplingParams, ThinkingBudget
from kvserve.workers.engine.structured_spec import StructuredOutputSpec
from kvserve.workers.llm import LLM

# No free-form strings: a random model would take hundreds of tokens to close one.
ORDER = {
    "type": "object",
    "properties": {
        "size": {"enum": ["small", "large"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 99},
        "paid": {"type": "boolean"},
        "extras": {"type": "array", "items": {"enum": ["ice", "lemon"]}, "maxItems": 2},
        "table": {
            "type": "object",
            "properties": {"row": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["row"],
        },
    },
    "required": ["size", "count", "paid", "extras", "table"],
}
PHONE = r"\d{3}-\d{4}"
CHOICES = ["yes", "no", "it depends"]
SUM_GRAMMAR = r"""
root ::= number (" + " number)*
number ::= [1-9] [0-9]?
"""


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=64, max_model_len=512)


def guided(n: int = 2, max_tokens: int = 300, **form) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=max_tokens,
                          structured=StructuredOutputSpec(**form))


def texts(output) -> list[str]:
    assert all(o.finish_reason == "stop" for o in output.outputs), [o.finish_reason for o in output.outputs]
    return [o.text for o in output.outputs]


def test_every_output_follows_its_grammar(llm):
    prompts = ["Order:", "Call me at", "Well?", "Add:", "Order again:"]
    params = [guided(json_schema=ORDER), guided(regex=PHONE), guided(choice=CHOICES),
              guided(grammar=SUM_GRAMMAR, max_tokens=40), guided(n=1, json_object=True, max_tokens=400)]
    order, phone, choice, total, anything = llm.generate(prompts, params)
    for text in texts(order):
        jsonschema.validate(json.loads(text), ORDER)
    assert all(re.fullmatch(PHONE, text) for text in texts(phone))
    assert all(text in CHOICES for text in texts(choice))
    for text in texts(total):
        assert re.fullmatch(r"[1-9][0-9]?( \+ [1-9][0-9]?)*", text)
    assert isinstance(json.loads(texts(anything)[0]), dict)


def test_a_grammar_after_a_token_holds_from_the_token_after_it(llm):
    """A reasoning model's structured output: free until its thinking ends (`after_token_id`,
    here `</think>`, which the bias makes the first token), then the grammar."""
    think_end = llm.engine.tokenizer.convert_tokens_to_ids("</think>")
    after = StructuredOutputSpec(json_schema=ORDER, after_token_id=think_end)
    ended = SamplingParams(temperature=1.0, seed=3, max_tokens=300, logit_bias={think_end: 100.0}, structured=after)
    [output] = llm.generate(["Order:"], ended)
    first, *rest = output.outputs[0].token_ids
    assert first == think_end and output.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(llm.engine.tokenizer.decode(rest, skip_special_tokens=True)), ORDER)
    # While the thinking goes on the output is what it is without a grammar.
    never = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias={think_end: -100.0})
    [free] = llm.generate(["Order:"], never)
    [thinking] = llm.generate(["Order:"], never.model_copy(update={"structured": after}))
    assert thinking.outputs[0].token_ids == free.outputs[0].token_ids
    with pytest.raises(ValueError, match="after_token_id 512 is outside the vocabulary"):
        llm.generate(["Order:"], never.model_copy(update={"structured": StructuredOutputSpec(
            json_object=True, after_token_id=512)}))


def test_a_thinking_budget_ends_the_thinking_and_the_grammar_follows(llm):
    """A thinking that would not end (its end token biased away) is ended at its budget: the
    tokens before are those it thinks without a budget, the end is forced once, and a grammar
    waiting for the end then holds."""
    think_end = llm.engine.tokenizer.convert_tokens_to_ids("</think>")
    endless = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={think_end: -100.0})
    [free] = llm.generate(["Order:"], endless)
    assert think_end not in free.outputs[0].token_ids
    for budget in (0, 5):
        bounded = endless.model_copy(update={"thinking_budget": ThinkingBudget(end_token_id=think_end,
                                                                               max_tokens=budget)})
        assert bounded.reads_tokens
        tokens = llm.generate(["Order:"], bounded)[0].outputs[0].token_ids
        assert tokens[:budget] == free.outputs[0].token_ids[:budget]
        assert tokens[budget] == think_end and tokens.count(think_end) == 1 and len(tokens) == 12
    answered = SamplingParams(temperature=1.0, seed=3, max_tokens=300, logit_bias={think_end: -100.0},
                              thinking_budget=ThinkingBudget(end_token_id=think_end, max_tokens=4),
                              structured=StructuredOutputSpec(json_schema=ORDER, after_token_id=think_end))
    [output] = llm.generate(["Order:"], answered)
    tokens = output.outputs[0].token_ids
    assert tokens[4] == think_end and output.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(llm.engine.tokenizer.decode(tokens[5:], skip_special_tokens=True)), ORDER)


def test_a_thinking_the_output_may_skip_holds_the_grammar_back_only_once_opened(llm):
    """Qwen3's output opens its thinking itself or skips it (`opened_by_token_id`): skipped
    (the opening token biased away), the grammar holds from the first token; opened (biased
    in, the end away), the output is what it is without a grammar."""
    think, think_end = llm.engine.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    spec = StructuredOutputSpec(json_schema=ORDER, after_token_id=think_end, opened_by_token_id=think)
    skipped = SamplingParams(temperature=1.0, seed=3, max_tokens=300, logit_bias={think: -100.0}, structured=spec)
    [output] = llm.generate(["Order:"], skipped)
    assert output.outputs[0].finish_reason == "stop"
    answer = llm.engine.tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)
    jsonschema.validate(json.loads(answer), ORDER)
    opening = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={think: 100.0, think_end: -100.0})
    [free] = llm.generate(["Order:"], opening)
    [opened] = llm.generate(["Order:"], opening.model_copy(update={"structured": spec}))
    assert free.outputs[0].token_ids[0] == think
    assert opened.outputs[0].token_ids == free.outputs[0].token_ids
    with pytest.raises(ValueError, match="opened_by_token_id 512 is outside the vocabulary"):
        llm.generate(["Order:"], opening.model_copy(update={"structured": StructuredOutputSpec(
            json_object=True, after_token_id=think_end, opened_by_token_id=512)}))


def test_a_thinking_budget_counts_only_a_thinking_the_output_opened(llm):
    """With `opened_by_token_id` an output that skips its thinking has no budget to run out, and
    one that opens it is given the budget's tokens after the opening one."""
    think, think_end = llm.engine.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    budget = ThinkingBudget(end_token_id=think_end, max_tokens=2, opened_by_token_id=think)
    skipping = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                              logit_bias={think: -100.0, think_end: -100.0})
    [free] = llm.generate(["Order:"], skipping)
    [skipped] = llm.generate(["Order:"], skipping.model_copy(update={"thinking_budget": budget}))
    assert skipped.outputs[0].token_ids == free.outputs[0].token_ids
    opening = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                             logit_bias={think: 100.0, think_end: -100.0}, thinking_budget=budget)
    tokens = llm.generate(["Order:"], opening)[0].outputs[0].token_ids
    assert tokens[:3] == [think, think, think] and tokens[3] == think_end and tokens.count(think_end) == 1


def test_guided_and_plain_requests_share_a_batch(llm):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    [alone] = llm.generate(["Hello there"], plain)
    together = llm.generate(["Hello there", "Pick one:"], [plain, guided(choice=CHOICES, n=1)])
    assert together[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert texts(together[1])[0] in CHOICES


def test_seeded_guided_outputs_repeat_with_logprobs_of_allowed_tokens(llm):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=200, logprobs=2,
                            structured=StructuredOutputSpec(json_schema=ORDER))
    first, again = (llm.generate(["Order:"], params)[0].outputs[0] for _ in range(2))
    assert first.text == again.text  # the second run also hits the prefix cache
    jsonschema.validate(json.loads(first.text), ORDER)
    assert all(lp.logprob > float("-inf") for lp in first.logprobs)


def test_preempted_guided_samples_resume_their_grammar(tiny_checkpoints):
    small = LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=12, block_size=16, max_model_len=160)
    prompts = ["Order one:", "Order two:", "Order three:", "Order four:"]
    outputs = small.generate(prompts, guided(json_schema=ORDER, n=1, max_tokens=150))
    assert small.engine.scheduler.num_preemptions > 0
    for output in outputs:
        for text in texts(output):
            jsonschema.validate(json.loads(text), ORDER)


def test_min_tokens_with_a_grammar_is_refused():
    with pytest.raises(ValueError, match="min_tokens cannot be used with a structured output"):
        SamplingParams(min_tokens=2, structured=StructuredOutputSpec(choice=CHOICES))
