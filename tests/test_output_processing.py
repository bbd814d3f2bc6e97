"""Output processing off the step loop: an engine whose outputs are processed several steps
late (as the Serve replica does, on its event loop) gives every request what the engine that
processes them inline gives, stop strings included, and never a token past max_tokens."""

import collections

import pytest

from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM

ENGINE = dict(device="cpu", num_kv_blocks=128, max_model_len=256)
PROMPTS = ["Once upon a time", "The quick brown fox", "Hello there", "A small robot builds"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(str(tiny_checkpoints["llama"]), **ENGINE)


def requests_with_stops(llm) -> list[SamplingParams]:
    """Greedy requests, each with a stop string taken from the middle of its own free text, so
    that it is hit after a few tokens; and a sampled n=3 request with logprobs whose samples stop
at common letters, each at its own step."""
    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    params = []
    for out in llm.generate(PROMPTS, free):
        text = out.outputs[0].text
        params.append(free.model_copy(update={"stop": [text[8:11]]}))
    params.append(SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24, ignore_eos=True, logprobs=2,
                                 stop=["e", "a"]))
    return params


def final_fields(outputs) -> list[list[tuple]]:
    return [[(o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in out.outputs] for out in outputs]


def deferred_generate(engine, prompts, params, lag: int) -> list[list[tuple]]:
    """Steps the engine with its outputs processed `lag` steps late; what each request streamed,
    put together."""
    processor = engine.detach_outputs()
    streams = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        token_ids = engine.tokenizer.encode(prompt)
        engine.add_request(f"r{i}", token_ids, p)
        processor.add_request(f"r{i}", None, token_ids, p)
        streams[f"r{i}"] = {k: ["", [], None, None] for k in range(p.n)}
    in_flight = collections.deque()
    while engine.has_unfinished_requests() or in_flight:
        if engine.has_unfinished_requests():
            in_flight.append(engine.step_tokens())
        if len(in_flight) > lag or not engine.has_unfinished_requests():
            outputs, stopped = processor.process(in_flight.popleft())
            engine.stop_samples(stopped)
            for out in outputs:
                for o in out.outputs:
                    stream = streams[out.request_id][o.index]
                    stream[0] += o.delta_text
                    stream[1] += o.delta_token_ids
                    stream[2:] = [o.finish_reason, o.stop_reason]
    assert processor.requests == {} and engine.kv.num_free_blocks == engine.kv.num_blocks
    return [[tuple(s) for s in streams[f"r{i}"].values()] for i in range(len(prompts))]


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_late_processing_streams_what_inline_processing_returns(llm, tiny_checkpoints, lag):
    params = requests_with_stops(llm)
    prompts = PROMPTS + ["Every engineer"]
    expected = final_fields(llm.generate(prompts, params))
    assert all(out[0][2] == "stop" for out in expected[: len(PROMPTS)])
    assert len({len(sample[1]) for sample in expected[-1]}) > 1, "the samples should stop at different steps"
    deferred = LLM(str(tiny_checkpoints["llama"]), **ENGINE).engine
    assert deferred_generate(deferred, prompts, params, lag) == expected


def test_no_token_past_max_tokens_however_late_the_outputs(tiny_checkpoints):
    engine = LLM(str(tiny_checkpoints["llama"]), **ENGINE).engine
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, stop=["never appears"])] * 3
    results = deferred_generate(engine, PROMPTS[:3], params, lag=4)
    assert all(len(sample[1]) == 5 and sample[2] == "length" for out in results for sample in out)


def test_an_engine_with_detached_outputs_cannot_step_inline(tiny_checkpoints):
    engine = LLM(str(tiny_checkpoints["llama"]), **ENGINE).engine
    engine.detach_outputs()
    with pytest.raises(RuntimeError, match="step_tokens"):
        engine.step()
