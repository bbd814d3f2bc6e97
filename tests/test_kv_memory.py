"""Sizing the KV pool: the arithmetic on CPU with an H100's numbers, the choice between the
config's keys, and the profiled sizing itself on CUDA."""

import gc

import pytest
import torch

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.runner.kv_memory import GIB, blocks_for_gpu, blocks_in, bytes_per_block
from kvserve.workers.runner.model_runner import ModelRunner

H100_TOTAL = 85_029_158_912  # what torch.cuda.mem_get_info reports on an 80 GB H100: 79.19 GiB
LLAMA3_8B_WEIGHTS = 16_060_522_496  # bf16
ACTIVATIONS = 3 * 2**29  # 1.5 GiB at the peak of the warm-up step


def test_llama3_8b_block_bytes():
    # 32 layers x (K and V) x 16 tokens x 8 KV heads x 128 dims
    assert bytes_per_block(32, 16, 8, 128, torch.bfloat16) == 2 * 2**20
    assert bytes_per_block(32, 16, 8, 128, torch.float8_e4m3fn) == 2**20


def test_blocks_for_gpu_on_an_h100():
    used = LLAMA3_8B_WEIGHTS + ACTIVATIONS
    # 0.9 * 79.19 GiB - 14.96 GiB - 1.5 GiB = 54.81 GiB, in blocks of 2 MiB (bf16) or 1 MiB (FP8)
    assert blocks_for_gpu(H100_TOTAL, H100_TOTAL - GIB, used, 0.9, 2 * 2**20) == 28064
    assert blocks_for_gpu(H100_TOTAL, H100_TOTAL - GIB, used, 0.9, 2**20) == 56128
    assert blocks_for_gpu(H100_TOTAL, H100_TOTAL - GIB, used, 0.5, 2 * 2**20) == 11846


def test_blocks_for_gpu_names_the_keys_when_nothing_fits():
    with pytest.raises(ValueError, match="no KV block fits.*raise gpu_memory_utilization, lower max_num_batched_tokens"):
        blocks_for_gpu(H100_TOTAL, H100_TOTAL, LLAMA3_8B_WEIGHTS + ACTIVATIONS, 0.2, 2 * 2**20)
    # Another process holds 40 GiB: 0.9 of the GPU is no longer there to take.
    with pytest.raises(ValueError, match="only 39.19 GiB were free.*lower gpu_memory_utilization"):
        blocks_for_gpu(H100_TOTAL, H100_TOTAL - 40 * GIB, LLAMA3_8B_WEIGHTS, 0.9, 2 * 2**20)


@pytest.mark.parametrize(
    "options, gib",
    [
        pytest.param({"num_kv_blocks": 48, "kv_cache_memory_gib": 0.5}, None, id="num_kv_blocks-wins"),
        pytest.param({"kv_cache_memory_gib": 0.002}, 0.002, id="kv_cache_memory_gib"),
        pytest.param({}, 1.0, id="1-GiB-on-cpu"),
    ],
)
def test_pool_size_on_cpu(tiny_checkpoints, options, gib):
    runner = ModelRunner(EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", **options))
    expected = 48 if gib is None else blocks_in(gib, runner._block_bytes())
    assert runner.num_kv_blocks == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pool_takes_the_share_of_the_gpu_the_model_leaves(tiny_checkpoints):
    config = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cuda")
    total = torch.cuda.mem_get_info()[1]
    blocks = {}
    for utilization in (0.3, 0.4):
        runner = ModelRunner(config.model_copy(update={"gpu_memory_utilization": utilization}))
        blocks[utilization], block_bytes = runner.num_kv_blocks, runner._block_bytes()
        assert torch.cuda.memory_allocated() <= utilization * total
        del runner
        gc.collect()
        torch.cuda.empty_cache()
    # The model's share is the same both times: the extra tenth of the GPU goes to the pool whole.
    assert abs((blocks[0.4] - blocks[0.3]) * block_bytes - 0.1 * total) < 64 * 2**20
    runner = ModelRunner(config.model_copy(update={"num_kv_blocks": 100}))
    assert runner.num_kv_blocks == 100
