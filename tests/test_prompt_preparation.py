"""The ingress's prompt preparation (`ServedModel.prepare`): tokens and block hashes as the
replicas compute them, and long prompts prepared while the event loop goes on serving; and
what a reasoning model's prompt says of its output's sampling (`ServedModel.after_thinking`)."""

import asyncio
import threading

import pytest

from kvserve.cluster.app import ingress_settings
from kvserve.cluster.config import parse_config
from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.router.errors import OpenAIError
from kvserve.router.openai_schema import ChatCompletionRequest
from kvserve.router.served_model import OFF_LOOP_PROMPT_CHARS, ServedModel
from kvserve.workers.engine.block_hash import hash_block_chain
from kvserve.workers.engine.sampling_params import ThinkingBudget


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ServedModel:
    """The ingress's view of a tiny model with room for long prompts (no Ray, no replicas)."""
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("long"), "llama", max_position_embeddings=16384)
    settings = ingress_settings(parse_config({"engine": {"model": str(folder)}}))
    return ServedModel(settings, llm=None, llm_app="unused")


def long_text(model: ServedModel) -> str:
    text = "the quick brown fox jumps over the lazy dog " * (OFF_LOOP_PROMPT_CHARS // 40)
    assert len(text) >= OFF_LOOP_PROMPT_CHARS and len(model.tokenizer.encode(text)) < model.max_model_len
    return text


def test_prompts_come_with_the_engines_block_hashes(model):
    text = long_text(model)
    ids = model.tokenizer.encode(text)
    short, long_, given = asyncio.run(model.prepare(["hello there", text, ids[:40]], "salt", "adapter"))
    assert (long_.text, long_.ids) == (text, ids)
    assert long_.block_hashes == hash_block_chain(ids, model.block_size, "salt", "adapter")
    assert short.ids == model.tokenizer.encode("hello there")
    assert given.ids == ids[:40] and given.text == model.tokenizer.decode(ids[:40])
    assert given.block_hashes == hash_block_chain(ids[:40], model.block_size, "salt", "adapter")


def test_a_long_prompt_is_tokenized_while_the_event_loop_runs(model, monkeypatch):
    """Tokenizing waits until a coroutine started after it has run: on the event loop's own
    thread it would wait for ever (here: fail after 10 s)."""
    text, loop_ran = long_text(model), threading.Event()
    encode = model.tokenizer.encode

    def encode_once_the_loop_ran(*args, **kwargs):
        if not loop_ran.wait(timeout=10):
            raise AssertionError("the event loop did not run while the prompt was tokenized")
        return encode(*args, **kwargs)

    async def mark_the_loop_ran():
        loop_ran.set()

    async def both():
        return await asyncio.gather(model.prepare([text], None), mark_the_loop_ran())

    monkeypatch.setattr(model.tokenizer, "encode", encode_once_the_loop_ran)
    [prompt], _ = asyncio.run(both())
    assert len(prompt.ids) > OFF_LOOP_PROMPT_CHARS // 10


def test_a_too_long_prompt_is_a_bad_request_from_the_thread_too(model):
    text = "word " * (4 * model.max_model_len)
    with pytest.raises(OpenAIError) as error:
        asyncio.run(model.prepare([text], None))
    assert (error.value.status, error.value.param) == (400, "prompt")


def test_a_thinking_qwen3_may_skip_is_bounded_only_once_opened(tmp_path):
    """Qwen3's output opens its thinking itself, or skips it: its grammar and its thinking
    budget wait for the thinking's end only if the output opens with `<think>`. A prompt that
    opened the thinking leaves no choice; one that closed it leaves no thinking."""
    folder = build_tiny_checkpoint(tmp_path, "qwen3")
    settings = ingress_settings(parse_config({"engine": {"model": str(folder)},
                                              "serving": {"reasoning_parser": "qwen3"}}))
    model = ServedModel(settings, llm=None, llm_app="unused")
    think, think_end = model.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    body = ChatCompletionRequest(model=model.name, messages=[{"role": "user", "content": "Hi"}],
                                 thinking_token_budget=4, response_format={"type": "json_object"})
    sampling = body.sampling(16, None)
    text = model.chat_prompt(body)
    for prompt, opener in ((text, think), (text + "<think>\n", None)):
        [prepared] = asyncio.run(model.prepare([prompt], None, None))
        after = model.after_thinking(sampling, prepared, body)
        assert (after.structured.after_token_id, after.structured.opened_by_token_id) == (think_end, opener)
        assert after.thinking_budget == ThinkingBudget(end_token_id=think_end, max_tokens=4, opened_by_token_id=opener)
    closed = ChatCompletionRequest(**{**body.model_dump(exclude_unset=True),
                                      "chat_template_kwargs": {"enable_thinking": False}})
    [prepared] = asyncio.run(model.prepare([model.chat_prompt(closed)], None, None))
    assert model.after_thinking(sampling, prepared, closed) is sampling
