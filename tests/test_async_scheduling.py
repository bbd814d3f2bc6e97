"""Async scheduling, forced on the CPU: each step is planned while the one before it is still
"running" and takes its pending tokens from that step's device tensor. Every request gets
exactly what synchronous scheduling gives it: greedy and seeded tokens, logprobs, stops, under
preemption, chunked prefill, prefix hits, forks and aborts."""

import random

import pytest

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM

PRESSURE = [
    pytest.param(dict(num_kv_blocks=40, max_model_len=128, block_size=8), id="preempting-pool"),
    pytest.param(dict(num_kv_blocks=128, max_model_len=256, max_num_batched_tokens=24), id="chunked-prefill"),
    pytest.param(dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=3), id="few-seqs"),
]


def requests(vocab: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(20)]
    out = []
    for i in range(12):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        kind = i % 4
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=rng.randint(5, 40), ignore_eos=True, logprobs=2)
        elif kind == 1:
            params = SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=rng.randint(5, 30))
        elif kind == 2:
            params = SamplingParams(n=2, temperature=1.0, seed=i, max_tokens=12, stop=["e"])
        else:
            params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[rng.randrange(3, vocab)])
        out.append((prompt, params))
    return out


def logprob_parts(logprobs) -> tuple[list | None, list[float]]:
    """The ids of each sampled token and its top tokens, and all their logprobs, flat."""
    if logprobs is None:
        return None, []
    ids = [(lp.token_id, [t for t, _ in lp.top]) for lp in logprobs]
    return ids, [v for lp in logprobs for v in (lp.logprob, *(v for _, v in lp.top))]


def assert_same(got: dict, expected: dict) -> None:
    """Equal, but for the logprobs' last bits: a step that batches other rows sums in another
    order, which moves those (never the tokens)."""
    assert got.keys() == expected.keys()
    for request_id, outputs in expected.items():
        for mine, theirs in zip(got[request_id], outputs, strict=True):
            assert mine[:-1] == theirs[:-1], request_id
            assert mine[-1] == pytest.approx(theirs[-1], abs=1e-4), request_id


def run(llm: LLM, reqs, abort_at: int | None = None) -> dict:
    engine, results, step = llm.engine, {}, 0
    for i, (prompt, params) in enumerate(reqs):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = [(o.token_ids, o.text, o.finish_reason, o.stop_reason,
                                            *logprob_parts(o.logprobs)) for o in out.outputs]
        step += 1
        if step == abort_at:
            results["r5"] = engine.abort_request("r5").outputs[0].token_ids
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return results


@pytest.mark.parametrize("options", PRESSURE)
def test_async_scheduling_gives_what_synchronous_scheduling_gives(tiny_checkpoints, options):
    model = str(tiny_checkpoints["llama"])
    sync = LLM(model, device="cpu", async_scheduling="off", **options)
    overlapped = LLM(model, device="cpu", async_scheduling="on", **options)
    assert overlapped.engine.overlaps_steps and not sync.engine.overlaps_steps
    reqs = requests(sync.engine.vocab_size)
    assert_same(run(overlapped, reqs), run(sync, reqs))


def test_an_abort_mid_run_leaves_the_others_unchanged(tiny_checkpoints):
    model = str(tiny_checkpoints["llama"])
    options = dict(device="cpu", num_kv_blocks=128, max_model_len=256)
    reqs = [(p, params.model_copy(update={"n": 1, "stop": []})) for p, params in requests(500, seed=1)]
    expected = run(LLM(model, async_scheduling="off", **options), reqs, abort_at=4)
    got = run(LLM(model, async_scheduling="on", **options), reqs, abort_at=4)
    assert_same({k: v for k, v in got.items() if k != "r5"}, {k: v for k, v in expected.items() if k != "r5"})


def test_penalties_wait_for_the_tokens_they_read(tiny_checkpoints):
    model = str(tiny_checkpoints["llama"])
    options = dict(device="cpu", num_kv_blocks=128, max_model_len=256)
    reqs = requests(500, seed=2) + [([5, 6, 7, 8], SamplingParams(temperature=0, repetition_penalty=1.3,
                                                                   presence_penalty=0.5, max_tokens=20))]
    assert_same(run(LLM(model, async_scheduling="on", **options), reqs), run(LLM(model, async_scheduling="off", **options), reqs))


def test_no_token_is_computed_past_max_tokens(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=64, max_model_len=256, async_scheduling="on")
    engine, computed = llm.engine, []
    launch = engine.runner.launch

    def counting_launch(step, *args):
        computed.extend(seq.num_output_tokens for seq in step.batch.seqs
                        if seq.num_computed_tokens >= seq.num_prompt_tokens)
        return launch(step, *args)

    engine.runner.launch = counting_launch
    llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert computed and max(computed) <= 5, "a sequence fed its 6th token back in: a 7th was being made"


def test_async_on_needs_the_model_in_process():
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(model="m", tp_size=2, async_scheduling="on")


def test_prompts_scored_with_steps_overlapped_get_the_same_logprobs(tiny_checkpoints):
    """Prompt logprobs come with the launched step's result, chunk by chunk, read a step later."""
    model = str(tiny_checkpoints["llama"])
    options = dict(device="cpu", num_kv_blocks=128, max_model_len=256, max_num_batched_tokens=24)
    reqs = [(p, params.model_copy(update={"prompt_logprobs": 2 if i % 2 else 0}))
            for i, (p, params) in enumerate(requests(500, seed=3))]

    def scored(llm: LLM) -> dict:
        outputs = llm.generate([p for p, _ in reqs], [params for _, params in reqs])
        return {i: [(e.token_id, e.rank, [t for t, _ in e.top], e.logprob) for e in out.prompt_logprobs[1:]]
                for i, out in enumerate(outputs)}

    overlapped = LLM(model, async_scheduling="on", **options)
    launch, launched_scoring = overlapped.engine.runner.launch, []

    def recording_launch(step, *args):
        launched_scoring.append(bool(step.prompt_scored))
        return launch(step, *args)

    overlapped.engine.runner.launch = recording_launch
    got, expected = scored(overlapped), scored(LLM(model, async_scheduling="off", **options))
    assert sum(launched_scoring) > 3  # chunks scored on the overlapped path
    for i, entries in expected.items():
        assert [e[:3] for e in got[i]] == [e[:3] for e in entries]
        assert [e[3] for e in got[i]] == pytest.approx([e[3] for e in entries], abs=1e-4)
