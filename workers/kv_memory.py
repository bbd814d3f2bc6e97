"""How large the KV pool is: bytes per block, and the blocks that fit in a memory budget."""

import torch

GIB = 2**30


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of every layer for `block_size` tokens."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def blocks_in(memory_gib: float, block_bytes: int) -> int:
    return int(memory_gib * GIB) // block_bytes
