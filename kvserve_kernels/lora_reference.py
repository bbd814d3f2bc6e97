"""LoRA deltas of a batch that mixes adapters, in plain PyTorch: the CPU path and the ground
truth for `lora_triton.py`.

Adapters sit in slots of a pool: `lora_a` [slots, in, rank] and `lora_b` [slots, rank, out],
ranks zero-padded to the pool's; `slot_of_token` names each token row's slot, -1 for none.
"""

import torch


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    slot_of_token: torch.Tensor,
) -> torch.Tensor:
    """y[t] += (x[t] @ lora_a[s]) @ lora_b[s] * scalings[s] for s = slot_of_token[t] >= 0, in
    place; returns y. The rows of one slot are multiplied together, computed in float32."""
    for slot in slot_of_token.unique().tolist():
        if slot < 0:
            continue
        rows = (slot_of_token == slot).nonzero().squeeze(1)
        shrunk = x[rows].float() @ lora_a[slot].float()
        delta = shrunk @ lora_b[slot].float() * scalings[slot].float()
        y[rows] += delta.to(y.dtype)
    return y
