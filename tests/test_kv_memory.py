"""Sizing the KV pool: the arithmetic on CPU with an H100's numbers, the choice between the
config's keys, a draft model's share, and the profiled sizing itself on CUDA."""

import gc

import pytest
import torch

from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.runner import start_engine
from kvserve.workers.runner.draft_model import DraftModelRunner
from kvserve.workers.runner.kv_memory import (
    GIB, NO_DRAFT, DraftMemory, blocks_for_gpu, blocks_in, bytes_per_block, draft_memory,
)
from kvserve.workers.runner.model_runner import ModelRunner

H100_TOTAL = 85_029_158_912  # what torch.cuda.mem_get_info reports on an 80 GB H100: 79.19 GiB
LLAMA3_8B_WEIGHTS = 16_060_522_496  # bf16
ACTIVATIONS = 3 * 2**29  # 1.5 GiB at the peak of the warm-up step
LLAMA32_1B_WEIGHTS = 2_471_628_800  # bf16
LLAMA32_1B_BLOCK = 2**19  # 16 layers x (K and V) x 16 tokens x 8 KV heads x 64 dims x 2 bytes


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


def test_a_draft_model_takes_its_weights_and_a_block_beside_each_of_the_pools():
    used = LLAMA3_8B_WEIGHTS + ACTIVATIONS
    draft = DraftMemory(weight_bytes=LLAMA32_1B_WEIGHTS, block_bytes=LLAMA32_1B_BLOCK)
    # 54.81 GiB - 2.30 GiB of draft weights = 52.51 GiB, in blocks of 2 MiB + 0.5 MiB: 6556 fewer
    # blocks than the 28064 without the draft.
    blocks = blocks_for_gpu(H100_TOTAL, H100_TOTAL - GIB, used, 0.9, 2 * 2**20, draft)
    assert blocks == 21508
    left = 0.9 * H100_TOTAL - used - LLAMA32_1B_WEIGHTS
    assert blocks * (2 * 2**20 + LLAMA32_1B_BLOCK) <= left < (blocks + 1) * (2 * 2**20 + LLAMA32_1B_BLOCK)
    with pytest.raises(ValueError, match="no KV block fits.*and the draft model's weights 2.30 GiB"):
        blocks_for_gpu(H100_TOTAL, H100_TOTAL, used, 0.22, 2 * 2**20, draft)


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory) -> str:
    """A draft for the tiny llama: its tokenizer, other layers and heads, a tied output head."""
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("draft") / "llama", "llama", hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     num_key_value_heads=1, tie_word_embeddings=True))


@pytest.mark.parametrize("same_shape", [True, False], ids=["target-as-draft", "small-draft"])
def test_draft_memory_is_what_the_draft_model_allocates(tiny_checkpoints, small_draft, same_shape):
    draft_dir = str(tiny_checkpoints["llama"]) if same_shape else small_draft
    config = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", dtype="bfloat16", max_model_len=64,
                          speculative={"method": "draft", "model": draft_dir, "num_speculative_tokens": 2})
    draft = DraftModelRunner(config, ModelConfig.from_pretrained_dir(config.model), num_kv_blocks=10)
    expected = draft_memory(config)
    loaded = [*draft.model.parameters(), *draft.model.buffers()]
    assert expected.weight_bytes == sum(tensor.nbytes for tensor in loaded)
    assert 10 * expected.block_bytes == sum(k.nbytes + v.nbytes for k, v in draft.kv_caches)


def test_no_rank_counts_a_draft_so_on_worker_actors_it_stays_off_the_gpu(tiny_checkpoints):
    """With worker actors the draft runs in the engine's process: refused there on CUDA before
    any rank starts (no Ray is running here)."""
    model = str(tiny_checkpoints["llama"])
    speculative = {"method": "draft", "model": model, "num_speculative_tokens": 2}
    on_ranks = EngineConfig(model=model, device="cuda", tp_size=2, speculative=speculative)
    assert draft_memory(on_ranks) == NO_DRAFT
    with pytest.raises(ValueError, match="speculative.model: with the model on worker actors .* use tp_size 1"):
        start_engine(on_ranks)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pool_leaves_room_for_a_draft_models_weights_and_kv_cache(tiny_checkpoints, small_draft):
    # A tenth of the GPU: the engine's Python block pool stays near a million blocks.
    options = dict(model=str(tiny_checkpoints["llama"]), device="cuda", gpu_memory_utilization=0.1,
                   enforce_eager=True)
    total = torch.cuda.mem_get_info()[1]
    release_cuda_memory()  # earlier tests' runners: allocated, but no pool's sizing counts them
    runner = ModelRunner(EngineConfig(**options))
    plain_blocks, block_bytes = runner.num_kv_blocks, runner._block_bytes()
    del runner
    release_cuda_memory()
    speculative = {"method": "draft", "model": small_draft, "num_speculative_tokens": 2}
    engine = start_engine(EngineConfig(**options, speculative=speculative))
    draft = draft_memory(engine.config)
    draft_kv = engine.speculation.draft_model.kv_caches
    assert sum(k.nbytes + v.nbytes for k, v in draft_kv) == engine.runner.num_kv_blocks * draft.block_bytes
    assert torch.cuda.memory_allocated() <= 0.1 * total
    # The target's share is the same both times: what the plain pool held now holds the draft's
    # weights and, beside each block, the draft's block.
    with_draft = engine.runner.num_kv_blocks * (block_bytes + draft.block_bytes) + draft.weight_bytes
    assert abs(with_draft - plain_blocks * block_bytes) < 64 * 2**20
    engine.shutdown()


def release_cuda_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
