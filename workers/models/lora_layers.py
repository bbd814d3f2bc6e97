"""LoRA on the decoder's linear layers: each layer's slot pool of adapter weights on the device,
and the step's adapter slot per token row that every layer reads.

A layer of P parts (q/k/v merged: 3, gate/up: 2, others: 1) holds per slot A [in, P * rank]
and B [P * rank, out]: part p's A in columns p * rank.., its B in rows p * rank.. and in the
output columns of its part, zero elsewhere, so one shrink and one expand give every part its own
delta. Ranks below the pool's are zero-padded.

With tensor parallelism each rank holds its share of every adapter, cut where the loader cuts the
layer's weight: a column-parallel layer (q/k/v, gate/up) keeps A whole and, of each part's B, the
output rows its weight holds (a KV head copied on the ranks that share it); a row-parallel one
(o_proj, down_proj) keeps the input columns of A that its weight holds and B whole, and adds its
delta to its partial output before the layer's all-reduce, which sums the ranks' x_r A_r^T B^T
into x A^T B^T: the delta once, with no communication of its own."""

from types import ModuleType

import torch

from kvserve.workers.models.decoder import DecoderForCausalLM
from kvserve.workers.models.parallel_layers import MergedLinear, ParallelLinear


class TokenAdapters:
    """Shared by the LoRA layers of one model: the scaling of each slot's adapter, and the slot of
    each token row of the step running (-1: the base model); None outside a step (warm-up)."""

    def __init__(self, max_loras: int, device: torch.device):
        self.scalings = torch.zeros(max_loras, dtype=torch.float32, device=device)
        self.slot_of_token: torch.Tensor | None = None


class LoRALayer:
    def __init__(self, layer: ParallelLinear, max_loras: int, max_rank: int, tokens: TokenAdapters, ops: ModuleType,
                 dtype: torch.dtype, device: torch.device):
        parts = range(len(layer.output_sizes)) if isinstance(layer, MergedLinear) else ()
        self.part_rows = [layer.rows_of_part(i) for i in parts] or [(0, layer.out_features)]
        self.part_out_slices = [layer.out_slice(i) for i in parts] or [None]
        self.in_slice = layer.in_slice()
        width = len(self.part_rows) * max_rank
        self.a = torch.zeros(max_loras, layer.in_features, width, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, width, layer.out_features, dtype=dtype, device=device)
        self.max_rank = max_rank
        self.tokens = tokens
        self.ops = ops

    def write(self, slot: int, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot `slot` holds the adapter whose (A [rank, in], B [out, rank]) of each part are
        `parts` (parts it does not adapt: zero)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for part, (lora_a, lora_b) in parts.items():
            lora_a, lora_b = self._shard(part, lora_a, lora_b)
            rank, (first_row, num_rows) = lora_a.shape[0], self.part_rows[part]
            columns = slice(part * self.max_rank, part * self.max_rank + rank)
            self.a[slot, :, columns] = lora_a.T
            self.b[slot, columns, first_row : first_row + num_rows] = lora_b.T

    def _shard(self, part: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of a part's A and B: the checkpoint slices its weight holds."""
        out_slice = self.part_out_slices[part]
        if out_slice is not None:
            lora_b = lora_b.narrow(0, *out_slice)
        if self.in_slice is not None:
            lora_a = lora_a.narrow(1, *self.in_slice)
        return lora_a, lora_b

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        slots = self.tokens.slot_of_token
        if slots is None:
            return y
        return self.ops.add_lora(y, x, self.a, self.b, self.tokens.scalings, slots)


def attach_lora(model: DecoderForCausalLM, max_loras: int, max_rank: int, ops: ModuleType,
                dtype: torch.dtype, device: torch.device) -> tuple[TokenAdapters, dict[str, LoRALayer]]:
    """Gives every linear layer of the decoder layers an empty slot pool; returns the pools'
    shared token slots and the pools by module name (`layers.3.self_attn.qkv_proj`)."""
    tokens = TokenAdapters(max_loras, device)
    pools = {}
    for name, layer in model.layers.named_modules(prefix="layers"):
        if isinstance(layer, ParallelLinear):
            layer.lora = pools[name] = LoRALayer(layer, max_loras, max_rank, tokens, ops, dtype, device)
    return tokens, pools
