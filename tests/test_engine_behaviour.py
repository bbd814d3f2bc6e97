"""Sampling, stopping, aborting and bad input, through the whole engine on a tiny model."""

import json
import random
import shutil
import time

import pytest

from kvserve.workers.engine import block_hash
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.prompt_checks import Overloaded
from kvserve.workers.engine.bad_words import bad_word_token_ids
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM
from kvserve.workers.protocol import RequestRefused
from kvserve.workers.runner import start_engine


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=64, max_model_len=256)


def texts(outputs):
    return [o.outputs[0].text for o in outputs]


def test_seeded_sampling_repeats_and_seeds_differ(llm):
    prompts = ["The quick brown fox", "Once upon a time", "Hello"]
    a = llm.generate(prompts, SamplingParams(temperature=1.0, seed=7, max_tokens=16))
    b = llm.generate(prompts[::-1], SamplingParams(temperature=1.0, seed=7, max_tokens=16))
    c = llm.generate(prompts, SamplingParams(temperature=1.0, seed=8, max_tokens=16))
    assert texts(a) == texts(b)[::-1]
    assert texts(a) != texts(c)


def test_parallel_samples_share_the_prompt_and_differ(llm):
    prompt = list(range(10, 47))  # 37 tokens: two full blocks and a partial one
    [out] = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=12, ignore_eos=True))
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_parallel_greedy_samples_equal_a_single_one(llm):
    prompt = list(range(5, 30))
    [single] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    [multi] = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True))
    assert all(o.token_ids == single.outputs[0].token_ids for o in multi.outputs)


def test_stop_string_ends_the_text_before_it(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    [free] = llm.generate(["Once upon a time"], params)
    full = free.outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    [stopped] = llm.generate(["Once upon a time"], params.model_copy(update={"stop": [stop]}))
    out = stopped.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]


def test_stop_token_and_max_tokens_and_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    [free] = llm.generate(["Hello there"], params)
    tokens = free.outputs[0].token_ids
    stop_id = tokens[4]
    first = tokens.index(stop_id)
    [stopped] = llm.generate(["Hello there"], params.model_copy(update={"stop_token_ids": [stop_id]}))
    assert stopped.outputs[0].token_ids == tokens[: first + 1]
    assert stopped.outputs[0].stop_reason == stop_id
    [probed] = llm.generate(["Hello there"], params.model_copy(update={"logprobs": 3, "max_tokens": 5}))
    out = probed.outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    for lp, token in zip(out.logprobs, out.token_ids):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][1] >= lp.logprob - 1e-6  # greedy picks the most likely


def test_abort_at_random_points_leaks_no_block(llm):
    engine = llm.engine
    rng = random.Random(0)
    for round_ in range(3):
        ids = []
        for i in range(8):
            rid = f"abort-{round_}-{i}"
            prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 60))]
            engine.add_request(rid, prompt, SamplingParams(max_tokens=rng.randint(1, 30), n=rng.choice([1, 2])))
            ids.append(rid)
        for _ in range(rng.randint(0, 12)):
            engine.step()
            if rng.random() < 0.5 and ids:
                engine.abort_request(ids.pop(rng.randrange(len(ids))))
        for rid in ids:
            engine.abort_request(rid)
        assert not engine.has_unfinished_requests()
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        assert all(b.ref_count == 0 for b in engine.kv.pool.blocks)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([5] * 300, SamplingParams(), "max_model_len"),
        ([], SamplingParams(), "empty"),
        ([5, 99999], SamplingParams(), "vocabulary"),
        ([5] * 200, SamplingParams(max_tokens=50, n=16), "KV blocks"),
        # Every token blocked until min_tokens: the sampler would have nothing to draw from.
        ([5, 6], SamplingParams(min_tokens=1, temperature=0.8, stop_token_ids=list(range(512))), "whole vocabulary"),
        ([5, 6], SamplingParams(min_tokens=2, stop_token_ids=[7, 9], allowed_token_ids=[9, 7]), "every one of allowed"),
        ([5, 6], SamplingParams(allowed_token_ids=[3, 512]), "allowed_token_ids holds 512, outside the vocabulary"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", prompt, params)
    [ok] = llm.generate(["still serving"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(ok.outputs[0].token_ids) == 3


def test_bad_words_that_leave_nothing_before_min_tokens_are_refused(llm):
    tokenizer = llm.engine.tokenizer
    word_tokens = {ids[0] for ids in bad_word_token_ids(tokenizer, ["a"])}
    assert all(len(tokenizer.encode(text, add_special_tokens=False)) == 1 for text in ("a", " a"))
    others = [t for t in range(llm.engine.vocab_size) if t not in word_tokens]
    with pytest.raises(ValueError, match="bad_words ban every token"):
        llm.engine.add_request("bad", [5, 6], SamplingParams(min_tokens=1, bad_words=["a"], stop_token_ids=others))
    [ok] = llm.generate([[5, 6]], SamplingParams(max_tokens=1, bad_words=["a"], stop_token_ids=others))
    assert ok.outputs[0].token_ids[0] not in word_tokens


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_past_max_queue_wait_a_newcomer_is_refused_as_overloaded_and_the_queue_is_served(tiny_checkpoints, policy):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=64, max_model_len=256, max_num_seqs=1,
              max_queue_wait_s=0.2, scheduling_policy=policy)
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for request_id in ("first", "second", "in time"):
        engine.add_request(request_id, [5] * 8, params)
    time.sleep(0.3)  # nothing has started: the oldest has now waited longer than 0.2 s
    with pytest.raises(Overloaded, match=r"max_queue_wait_s \(0.2 s\)"):
        engine.add_request("late", [8] * 8, params)
    assert RequestRefused.of(Overloaded("busy"), "r1") == RequestRefused("busy", overloaded=True, replica="r1")
    if policy == "priority":  # it would run before every waiting request: nothing waits ahead of it
        engine.add_request("urgent", [9] * 8, params, priority=-1)
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {out.request_id for out in engine.step() if out.finished}
    assert finished == {"first", "second", "in time"} | ({"urgent"} if policy == "priority" else set())
    engine.add_request("after", [8] * 8, params)  # the queue is empty again


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_pool_too_small_for_one_sequence(tiny_checkpoints):
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len"):
        start_engine(EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=4))


def test_unknown_architecture_and_missing_files(tiny_checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints["llama"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(broken), device="cpu")
    missing = tmp_path / "missing"
    shutil.copytree(tiny_checkpoints["llama"], missing)
    (missing / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(missing), device="cpu")


def test_unknown_engine_option_is_an_error(tiny_checkpoints):
    with pytest.raises(ValueError, match="max_num_seq"):
        EngineConfig(model=str(tiny_checkpoints["llama"]), max_num_seq=3)


def test_block_hashes_from_the_caller_are_used_not_computed_again(llm, monkeypatch):
    """The ingress hashes every prompt to route it; the engine takes that chain as it is."""
    prompt = list(range(100, 150))  # three full blocks of 16 and a partial one
    chain = block_hash.hash_block_chain(prompt, llm.engine.config.block_size)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    expected = llm.generate([prompt], params)[0].outputs[0].token_ids
    llm.engine.kv.reset_prefix_cache()
    calls = []
    real_digest = block_hash._block_digest
    monkeypatch.setattr(block_hash, "_block_digest", lambda *args: calls.append(args) or real_digest(*args))
    llm.engine.add_request("given-hashes", prompt, params, block_hashes=chain)
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    assert outputs[-1].outputs[0].token_ids == expected
    assert calls == [] and set(chain) <= set(llm.engine.cached_blocks().blocks)
