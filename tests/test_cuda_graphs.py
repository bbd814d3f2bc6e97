"""Decode steps padded to batch-size buckets through static buffers, against the plain eager
step: on CPU the padded step runs eagerly (the same code that a CUDA graph captures); on CUDA
the graphs themselves are captured and replayed."""

import pytest
import torch

from kvserve.workers.engine.executor import StepRequest
from kvserve.workers.runner.cuda_graphs import bucket_sizes
from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams

ENGINE = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 128, "max_num_seqs": 16, "block_size": 8}
PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(11)]
# Finishing one after another, the batch shrinks through sizes between buckets: 11, 10, ..., 1.
PARAMS = [SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True, logprobs=3) for i in range(11)]


def test_buckets():
    assert bucket_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert bucket_sizes(1000)[-1] == 256
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(3) == [1, 2, 3]
    assert bucket_sizes(1) == [1]


def padded_engine(model_dir, **options) -> tuple[LLM, list[int]]:
    """An engine whose decode steps go through the padded static buffers (on CPU, eagerly),
    and the batch sizes they ran with."""
    llm = LLM(str(model_dir), **ENGINE, **options)
    runner = llm.engine.runner
    runner.graphs = graphs = runner.decode_graphs()
    sizes = []
    run = graphs.run

    def run_and_record(input_ids, positions, meta):
        sizes.append(meta.num_seqs)
        return run(input_ids, positions, meta)

    graphs.run = run_and_record
    return llm, sizes


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_padded_decode_equals_eager_decode(tiny_checkpoints, kv_cache_dtype):
    model = tiny_checkpoints["qwen2"]
    eager = LLM(str(model), device="cpu", **ENGINE, kv_cache_dtype=kv_cache_dtype)
    padded, sizes = padded_engine(model, device="cpu", kv_cache_dtype=kv_cache_dtype)

    expected = eager.generate(PROMPTS, PARAMS)
    got = padded.generate(PROMPTS, PARAMS)

    assert {3, 5, 6, 7, 9, 10, 11} <= set(sizes)  # padded up to 4, 8 and 16
    for a, b in zip(expected, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert [t for t, _ in step_a.top] == [t for t, _ in step_b.top]
            torch.testing.assert_close([p for _, p in step_a.top], [p for _, p in step_b.top], atol=1e-5, rtol=0)
    # Padding rows wrote the scratch block past the pool, and no block of the pool differs.
    for (k_eager, v_eager), (k_padded, v_padded) in zip(eager.engine.runner.kv_caches, padded.engine.runner.kv_caches):
        scratch = padded.engine.runner.num_kv_blocks
        assert k_eager[scratch].float().abs().sum() == 0 and k_padded[scratch].float().abs().sum() > 0
        torch.testing.assert_close(k_padded[:scratch].float(), k_eager[:scratch].float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(v_padded[:scratch].float(), v_eager[:scratch].float(), atol=1e-5, rtol=0)


def test_only_decode_steps_within_the_buckets_are_padded(tiny_checkpoints, paged):
    """Prefill and mixed steps, batches past the largest bucket and contexts past the graphs'
    longest go the eager way."""
    graphs = LLM(str(tiny_checkpoints["llama"]), device="cpu", **ENGINE).engine.runner.decode_graphs()
    assert graphs.buckets[-1] == 16 and graphs.max_context_len == 128

    def step(context_lens, query_lens):
        return paged.metadata(paged.block_tables(context_lens, 8, 64), context_lens, query_lens, 8)

    assert graphs.covers(step([5] * 16, [1] * 16))
    assert graphs.covers(step([128, 1, 9], [1, 1, 1]))
    assert not graphs.covers(step([5] * 17, [1] * 17))
    assert not graphs.covers(step([5, 5, 9], [1, 1, 4]))
    assert not graphs.covers(step([7], [7]))
    assert not graphs.covers(step([129], [1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_eager_on_cuda(tiny_checkpoints):
    model = tiny_checkpoints["qwen2"]
    eager = LLM(str(model), device="cuda", **ENGINE, enforce_eager=True)
    graphed = LLM(str(model), device="cuda", **ENGINE)
    runner = graphed.engine.runner
    assert eager.engine.runner.graphs is None and sorted(runner.graphs.graphs) == runner.graphs.buckets

    expected, got = eager.generate(PROMPTS, PARAMS), graphed.generate(PROMPTS, PARAMS)

    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_decode_step_syncs_only_for_the_sampled_tokens(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cuda", **ENGINE)
    engine, runner = llm.engine, llm.engine.runner
    for i, prompt in enumerate(PROMPTS[:5]):
        engine.add_request(str(i), prompt, PARAMS[-1])
    engine.step()  # the prefills
    batch = engine.scheduler.schedule()
    samples = engine._sample_requests(batch)
    assert batch.num_new_tokens == [1] * 5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = runner.inputs.plan(StepRequest(batch, engine.kv.block_tables, samples, engine.eos_token_ids))
        with torch.inference_mode():
            logits = runner.logits(plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.graphs.covers(plan.meta) and logits.shape[0] == len(samples)
    assert len(runner.sampler(logits, plan.rows, plan.eos_token_ids).token_ids) == 5
