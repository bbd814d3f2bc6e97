"""What the attention ops need to know about one step's ragged batch."""

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Layout of the flattened tokens of one forward pass.

    The batch holds `num_seqs` sequences; decode sequences (one new token each) come first,
    then the sequences with several new tokens (prefill or chunked prefill). Sequence `i`
    owns the query rows `query_start_loc[i]:query_start_loc[i+1]`; its new tokens are the last
    `q_len` of its `context_lens[i]` tokens, whose K/V live in the blocks
    `block_tables[i, :ceil(context_lens[i] / block_size)]`.
    """

    num_decodes: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, on the model's device
    context_lens: torch.Tensor  # [num_seqs] int32, tokens in the cache after this step's store
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    max_query_len: int
    max_context_len: int
    query_start_loc_cpu: list[int]  # the same offsets as Python ints, for per-sequence loops
    context_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_cpu)
