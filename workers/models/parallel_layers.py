"""Megatron-style sharded layers: each rank holds a slice of a weight and knows which slice of
the checkpoint tensor it is, so the loader reads only that. With a group of size 1 they are
the plain layers.

Column-parallel (`MergedLinear`) splits the outputs and needs no communication; row-parallel
splits the inputs and sums the partial outputs with an all-reduce; vocabulary-parallel splits
the embedding rows and the logits columns.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.workers.models.distributed import SINGLE, TPGroup
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.linear_methods import DENSE, LinearMethod


def check_shardable(config: ModelConfig, tp_size: int) -> None:
    """Raise ValueError naming every size that does not split over `tp_size` ranks."""
    kv = config.num_kv_heads
    problems = [
        f"{name} {value} is not divisible by tp_size {tp_size}"
        for name, value in (
            ("num_attention_heads", config.num_heads),
            ("intermediate_size", config.intermediate_size),
        )
        if value % tp_size
    ]
    if kv >= tp_size and kv % tp_size:
        problems.append(f"num_key_value_heads {kv} is not divisible by tp_size {tp_size}")
    if kv < tp_size and tp_size % kv:
        problems.append(f"tp_size {tp_size} is not a multiple of num_key_value_heads {kv}")
    if problems:
        raise ValueError(f"cannot split model {config.architecture} over {tp_size} ranks: " + "; ".join(problems))


def kv_heads_of_rank(config: ModelConfig, tp: TPGroup) -> tuple[int, int]:
    """(first KV head, number of KV heads) of this rank. With fewer KV heads than ranks each
    rank keeps a copy of the one KV head its query heads read."""
    if config.num_kv_heads >= tp.size:
        count = config.num_kv_heads // tp.size
        return tp.rank * count, count
    ranks_per_kv_head = tp.size // config.num_kv_heads
    return tp.rank // ranks_per_kv_head, 1


class ParallelLinear(nn.Module):
    """A linear layer whose weights are laid out by its `method` (dense, FP8, packed integers)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: LinearMethod, in_total: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.method = method
        method.create_weights(self, in_features, out_features, in_total)
        self.lora = None  # a LoRALayer (lora_layers.py) when the engine serves adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return y if self.lora is None else self.lora.add_delta(y, x)

    def in_slice(self) -> tuple[int, int] | None:
        """(start, length) of the checkpoint's inputs this rank holds; None for all of them."""
        return None


class MergedLinear(ParallelLinear):
    """Several column-parallel projections of the same input stacked into one matmul. Part `i`
    is rows `starts[i]:starts[i] + output_sizes[i]` of its own checkpoint tensor."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, starts: list[int] | None = None,
                 method: LinearMethod = DENSE):
        super().__init__(in_features, sum(output_sizes), bias, method, in_features)
        self.output_sizes = output_sizes
        self.starts = starts

    def out_slice(self, index: int) -> tuple[int, int] | None:
        """(start, length) of part `index`'s checkpoint rows this rank holds; None for all of them."""
        if self.starts is None:
            return None
        return self.starts[index], self.output_sizes[index]

    def rows_of_part(self, index: int) -> tuple[int, int]:
        """(first row, number of rows) of part `index` in the merged weight."""
        return sum(self.output_sizes[:index]), self.output_sizes[index]


class RowParallelLinear(ParallelLinear):
    """`in_features` split over the ranks; the partial products are summed across them."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE, method: LinearMethod = DENSE):
        super().__init__(in_features // tp.size, out_features, False, method, in_features)
        self.tp = tp

    def in_slice(self) -> tuple[int, int] | None:
        if self.tp.size == 1:
            return None
        return self.tp.rank * self.in_features, self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Embedding):
    """A contiguous range of the vocabulary's rows per rank. Used as the LM head too: the
    logits of each rank's range are gathered into the whole vocabulary. A vocabulary that does
    not split evenly (a fine-tune's added tokens: 32001, 50257) is padded to a multiple of the
    ranks: the last rank's padding rows are never looked up, and their logits are cut off."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE):
        super().__init__(-(-vocab_size // tp.size), hidden_size)
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start = tp.rank * self.num_embeddings
        self.num_vocab_rows = max(0, min(self.num_embeddings, vocab_size - self.vocab_start))  # not padding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(embedded.masked_fill_(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather(F.linear(hidden, self.weight).float(), dim=-1)
        return logits[..., : self.vocab_size] if logits.shape[-1] != self.vocab_size else logits
