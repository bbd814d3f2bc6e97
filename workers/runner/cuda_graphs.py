"""Decode-only steps replayed from CUDA graphs, one captured per batch-size bucket.

A step's inputs are copied into static buffers and padded up to the next bucket. The padding
rows write their K/V into a scratch block outside the KV pool and attend only to it (a context
of one token), so they touch no sequence's cache. Before capture (and on a CPU, where nothing
is captured) the same padded step runs eagerly, which is how the padding is tested without a GPU.
"""

from collections.abc import Callable

import torch

from kvserve.kernels.metadata import AttentionMetadata

MAX_BATCH = 256
# Steps with longer contexts run eagerly: a graph's flash-decoding buffers are sized for this.
MAX_CONTEXT = 8192

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to min(max_num_seqs, 256), which is a bucket too."""
    largest = min(max_num_seqs, MAX_BATCH)
    return sorted({size for size in (1, 2, 4, *range(8, largest, 8)) if size < largest} | {largest})


class DecodeGraphs:
    def __init__(
        self,
        forward: Forward,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        scratch_block: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.forward = forward
        self.buckets = bucket_sizes(max_num_seqs)
        self.max_context_len = min(max_model_len, MAX_CONTEXT)
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        size, width = self.buckets[-1], -(-self.max_context_len // block_size)
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), self.scratch_slot, dtype=torch.long, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.block_tables = torch.full((size, width), scratch_block, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(size, hidden_size, dtype=dtype, device=device)
        self.metas = {size: self._meta(size) for size in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _meta(self, size: int) -> AttentionMetadata:
        """A bucket's metadata: views of the static buffers, and host-side sizes fixed for any
        step (the attention kernels are launched for the longest context)."""
        return AttentionMetadata(
            num_decodes=size,
            query_start_loc=self.query_start_loc[: size + 1],
            context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_context_len=self.max_context_len,
            query_start_loc_cpu=list(range(size + 1)),
            context_lens_cpu=[self.max_context_len] * size,
        )

    def covers(self, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == meta.num_seqs <= self.buckets[-1] and meta.max_context_len <= self.max_context_len

    def capture(self) -> None:
        """A graph per bucket, largest first, all in one memory pool. Each bucket runs once
        before its capture, so that Triton compiles its kernels outside the graph."""
        pool = None
        for size in reversed(self.buckets):
            self._run_eagerly(size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._run_eagerly(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states of a decode step that `covers` accepts."""
        num_seqs = meta.num_seqs
        size = next(size for size in self.buckets if size >= num_seqs)
        self._fill(input_ids, positions, meta, size)
        if size in self.graphs:
            self.graphs[size].replay()
        else:
            self._run_eagerly(size)
        return self.hidden[:num_seqs]

    def _run_eagerly(self, size: int) -> None:
        self.hidden[:size] = self.forward(self.input_ids[:size], self.positions[:size], self.metas[size])

    def _fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, size: int) -> None:
        """The step's rows, then padding rows of one token in the scratch slot (their token ids
        and positions, left from earlier steps, are valid ones). Block table columns past the
        step's width keep stale block ids, which no context length reaches."""
        num_seqs = meta.num_seqs
        self.input_ids[:num_seqs] = input_ids
        self.positions[:num_seqs] = positions
        self.slot_mapping[:num_seqs] = meta.slot_mapping
        self.context_lens[:num_seqs] = meta.context_lens
        self.block_tables[:num_seqs, : meta.block_tables.shape[1]] = meta.block_tables
        self.slot_mapping[num_seqs:size] = self.scratch_slot
        self.context_lens[num_seqs:size] = 1
        self.block_tables[num_seqs:size, 0] = self.scratch_block
