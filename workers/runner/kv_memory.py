"""How large the KV pool is: bytes per block, and the blocks that fit in a memory budget beside
the model (and a speculative draft model in the same process)."""

from dataclasses import dataclass

import torch

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.distributed import TPGroup
from kvserve.workers.models.loader import model_bytes
from kvserve.workers.models.parallel_layers import kv_heads_of_rank

GIB = 2**30
DEFAULT_CPU_KV_GIB = 1.0


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of every layer for `block_size` tokens."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def blocks_in(memory_gib: float, block_bytes: int) -> int:
    return int(memory_gib * GIB) // block_bytes


@dataclass(frozen=True)
class DraftMemory:
    """What speculative decoding's draft model takes on the target's device: its weights, and
    one block of its own KV cache beside each block of the target's pool."""

    weight_bytes: int = 0
    block_bytes: int = 0


NO_DRAFT = DraftMemory()


def blocks_for_gpu(total: int, free_at_start: int, peak_used: int, utilization: float, block_bytes: int,
                   draft: DraftMemory = NO_DRAFT) -> int:
    """Blocks that fit in `utilization` of a GPU's `total` bytes beside the engine's own peak use
    (weights, the activations of the largest step, memory outside torch's allocator) and the
    draft model's weights, each block taking `block_bytes` and the draft's block beside it."""
    budget = total * utilization
    if budget > free_at_start:
        raise ValueError(
            f"gpu_memory_utilization {utilization} asks for {budget / GIB:.2f} GiB of the GPU's {total / GIB:.2f} GiB "
            f"but only {free_at_start / GIB:.2f} GiB were free when the engine started: lower gpu_memory_utilization"
        )
    blocks = int(budget - peak_used - draft.weight_bytes) // (block_bytes + draft.block_bytes)
    if blocks < 1:
        draft_weights = (f" and the draft model's weights {draft.weight_bytes / GIB:.2f} GiB"
                         if draft.weight_bytes else "")
        raise ValueError(
            f"no KV block fits: gpu_memory_utilization {utilization} gives the engine {budget / GIB:.2f} GiB and the "
            f"model takes {peak_used / GIB:.2f} GiB at its peak (weights, and activations at max_num_batched_tokens)"
            f"{draft_weights}: raise gpu_memory_utilization, lower max_num_batched_tokens, or set num_kv_blocks"
        )
    return blocks


class GPUMemoryProfile:
    """This engine's use of its GPU, from before its weights load to the peak of a warm-up step."""

    def __init__(self, device: torch.device):
        self.device = device
        torch.cuda.reset_peak_memory_stats(device)
        self.free_at_start, self.total = torch.cuda.mem_get_info(device)
        self.allocated_at_start = torch.cuda.memory_allocated(device)
        self.reserved_at_start = torch.cuda.memory_reserved(device)

    def peak_used(self) -> int:
        """Torch's peak allocation since the start, plus what appeared on the device outside
        torch's allocator meanwhile (library workspaces, kernel code)."""
        torch.cuda.synchronize(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device) - self.reserved_at_start
        outside_torch = max(self.free_at_start - free - reserved, 0)
        return torch.cuda.max_memory_allocated(self.device) - self.allocated_at_start + outside_torch


def rank_block_bytes(config: EngineConfig, model: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one block of one rank's KV cache (its share of the KV heads) in `dtype`."""
    num_kv_heads = kv_heads_of_rank(model, TPGroup(0, config.tp_size))[1]
    return bytes_per_block(model.num_layers, config.block_size, num_kv_heads, model.head_dim, dtype)


def configured_pool_blocks(config: EngineConfig, block_bytes: int, on_cuda: bool) -> int | None:
    """The KV pool's size when the settings fix it: `num_kv_blocks`, what fits in
    `kv_cache_memory_gib`, or on a CPU the default budget; None when it is sized from the
    GPU's memory after a profiling run."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if config.kv_cache_memory_gib or not on_cuda:
        return blocks_in(config.kv_cache_memory_gib or DEFAULT_CPU_KV_GIB, block_bytes)
    return None


def draft_memory(config: EngineConfig) -> DraftMemory:
    """What the draft model of `config`, if it speculates with one, takes beside a target that
    runs in the engine's process, from the draft's config alone (it loads after the target's
    pool is sized). With worker actors no rank holds the draft: it runs in the engine's process
    (see `check_draft_device` in draft_model.py), so the ranks' pools leave it no room."""
    if config.speculative is None or config.speculative.method != "draft" or config.uses_workers:
        return NO_DRAFT
    draft_dir = config.speculative.model
    draft = ModelConfig.from_pretrained_dir(draft_dir)
    dtype = config.torch_dtype(draft.torch_dtype)  # of the draft's weights and KV cache, as `DraftModelRunner`'s
    return DraftMemory(
        weight_bytes=model_bytes(draft_dir, dtype, config.torch_device()),
        block_bytes=bytes_per_block(draft.num_layers, config.block_size, draft.num_kv_heads, draft.head_dim, dtype),
    )
