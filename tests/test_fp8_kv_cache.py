"""The engine with an FP8 (e4m3) KV cache against the same engine with a full-precision one."""

import random
import statistics

import pytest
import torch
from pydantic import ValidationError

from kvserve.workers.engine.config import EngineConfig, check_fp8_kv_cache
from kvserve.workers.llm import LLM
from kvserve.workers.runner.model_runner import ModelRunner
from kvserve.workers.engine.sampling_params import SamplingParams

ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256}


def logprob_gaps(model_dir, **fp8_options) -> tuple[list[float], int]:
    """|logprob differences| of the top-20 tokens shared by both engines at every step both
    reached with the same tokens, and how many first tokens agree, over 8 random prompts."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 60))] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=20)
    full = LLM(str(model_dir), **ENGINE).generate(prompts, params)
    fp8 = LLM(str(model_dir), **ENGINE, kv_cache_dtype="fp8_e4m3", **fp8_options).generate(prompts, params)
    gaps, same_first = [], 0
    for a, b in zip(full, fp8):
        same_first += a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            top_a, top_b = dict(step_a.top), dict(step_b.top)
            gaps += [abs(top_a[t] - top_b[t]) for t in top_a.keys() & top_b.keys()]
            if step_a.token_id != step_b.token_id:
                break
    return gaps, same_first


@pytest.mark.parametrize(
    "arch, options",
    [("llama", {}), ("qwen2", {}), ("qwen3", {"calculate_kv_scales": True})],
)
def test_fp8_logprobs_close_to_full_precision(tiny_checkpoints, arch, options):
    """e4m3 keeps 3 mantissa bits (a relative step of 1/16 to 1/8), so K and V carry a few
    percent of error; on these models that moves logprobs by about 0.05 on average. A scale
    applied wrongly moves them by whole units."""
    gaps, same_first = logprob_gaps(tiny_checkpoints[arch], **options)
    assert statistics.mean(gaps) < 0.15 and max(gaps) < 1.0
    assert same_first >= 6


def test_calibrated_scales_come_from_each_layers_k_and_v(tiny_checkpoints):
    runner = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), **ENGINE, kv_cache_dtype="fp8_e4m3",
                                      calculate_kv_scales=True))
    scales = [s for layer in runner.model.layers for s in (layer.self_attn.k_scale, layer.self_attn.v_scale)]
    # K and V reach a few units on this model: amax * FP8_HEADROOM / 448 is about 0.1.
    assert all(0.02 < s < 0.5 for s in scales) and len(set(scales)) == len(scales)
    assert not any(layer.self_attn.calibrate_kv_scales for layer in runner.model.layers)
    assert runner.kv_caches[0][0].dtype == torch.float8_e4m3fn


def test_fp8_halves_the_bytes_of_a_block_and_doubles_the_pool(tiny_checkpoints):
    config = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", dtype="bfloat16", kv_cache_memory_gib=0.01)
    bf16 = ModelRunner(config)
    fp8 = ModelRunner(config.model_copy(update={"kv_cache_dtype": "fp8_e4m3"}))
    assert fp8._block_bytes() * 2 == bf16._block_bytes()
    assert fp8.num_kv_blocks == 2 * bf16.num_kv_blocks
    k_cache = fp8.kv_caches[0][0]
    assert k_cache.dtype == torch.float8_e4m3fn and k_cache.shape[0] == fp8.num_kv_blocks + 1  # + the scratch block
    assert sum(k.nbytes + v.nbytes for k, v in fp8.kv_caches) == (fp8.num_kv_blocks + 1) * fp8._block_bytes()


def test_unsupported_combinations_name_the_key(tiny_checkpoints):
    with pytest.raises(ValidationError, match="calculate_kv_scales needs kv_cache_dtype"):
        EngineConfig(model=str(tiny_checkpoints["llama"]), calculate_kv_scales=True)
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        EngineConfig(model=str(tiny_checkpoints["llama"]), kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype: 'fp8_e4m3' needs a GPU of compute capability 8.9"):
        check_fp8_kv_cache("fp8_e4m3", (8, 0))  # an A100
    check_fp8_kv_cache("fp8_e4m3", (9, 0))
    check_fp8_kv_cache("auto", (7, 0))
