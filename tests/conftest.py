import itertools
from types import SimpleNamespace

import pytest
import torch

from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.kernels.metadata import AttentionMetadata

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """arch -> folder of a tiny random-weight checkpoint with its tokenizer, built once."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_checkpoint(root / arch, arch) for arch in TINY_ARCHS}


def random_block_tables(
    lengths: list[int], block_size: int, num_blocks: int, seed: int = 0
) -> list[list[int]]:
    """Enough blocks for each length, handed out from a shuffled pool."""
    pool = iter(torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist())
    return [list(itertools.islice(pool, -(-n // block_size))) for n in lengths]


def paged_metadata(
    block_tables: list[list[int]], context_lens: list[int], query_lens: list[int], block_size: int
) -> AttentionMetadata:
    """One step's metadata; sequence i's new tokens are the last query_lens[i] of its
    context_lens[i]. Sequences with one new token must come first."""
    starts = [0, *itertools.accumulate(query_lens)]
    slots = [
        table[p // block_size] * block_size + p % block_size
        for table, ctx, q in zip(block_tables, context_lens, query_lens)
        for p in range(ctx - q, ctx)
    ]
    width = max(len(t) for t in block_tables)
    return AttentionMetadata(
        num_decodes=sum(1 for _ in itertools.takewhile(lambda q: q == 1, query_lens)),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        query_start_loc_cpu=starts,
        context_lens_cpu=list(context_lens),
    )


@pytest.fixture(scope="session")
def paged():
    """The helpers above, for tests that lay out a paged batch by hand."""
    return SimpleNamespace(block_tables=random_block_tables, metadata=paged_metadata)
