"""The LoRA deltas of `lora_reference` in Triton, for the GPU path: a shrink kernel (each token
row times its slot's A, into float32 scratch) and an expand kernel (that times its slot's B,
scaled, added to a tile of the row's outputs). One program per token row (and output tile):
rows of different slots need nothing of each other. Both run under Triton's interpreter
(`TRITON_INTERPRET=1`) on CPU tensors, which is how the tests check them without a GPU."""

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # inputs per step of the shrink loop
BLOCK_N = 64  # outputs per expand program


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    slot_of_token: torch.Tensor,
) -> torch.Tensor:
    """y[t] += (x[t] @ lora_a[s]) @ lora_b[s] * scalings[s] for s = slot_of_token[t] >= 0, in
    place; returns y."""
    num_tokens, in_features = x.shape
    out_features, rank = y.shape[1], lora_a.shape[2]
    assert x.stride(1) == y.stride(1) == 1 and lora_a.is_contiguous() and lora_b.is_contiguous()
    shrunk = torch.empty(num_tokens, rank, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(rank)
    _shrink_kernel[(num_tokens,)](
        x, lora_a, slot_of_token, shrunk, in_features, rank, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        BLOCK_K=BLOCK_K, BLOCK_R=block_r,
    )
    _expand_kernel[(num_tokens, triton.cdiv(out_features, BLOCK_N))](
        shrunk, lora_b, scalings, slot_of_token, y, out_features, rank, y.stride(0), lora_b.stride(0),
        lora_b.stride(1), BLOCK_N=BLOCK_N, BLOCK_R=block_r,
    )
    return y


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slot_ptr, shrunk_ptr, K, R, x_stride, a_stride_slot, a_stride_in,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            inputs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token * x_stride + inputs, mask=inputs < K, other=0.0).to(tl.float32)
            a_offsets = slot * a_stride_slot + inputs[:, None] * a_stride_in + ranks[None, :]
            a = tl.load(a_ptr + a_offsets, mask=(inputs[:, None] < K) & (ranks[None, :] < R), other=0.0)
            acc += tl.sum(x[:, None] * a.to(tl.float32), axis=0)
        tl.store(shrunk_ptr + token * R + ranks, acc, mask=ranks < R)


@triton.jit
def _expand_kernel(
    shrunk_ptr, b_ptr, scaling_ptr, slot_ptr, y_ptr, N, R, y_stride, b_stride_slot, b_stride_rank,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        ranks = tl.arange(0, BLOCK_R)
        outputs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        shrunk = tl.load(shrunk_ptr + token * R + ranks, mask=ranks < R, other=0.0)
        b_offsets = slot * b_stride_slot + ranks[:, None] * b_stride_rank + outputs[None, :]
        b = tl.load(b_ptr + b_offsets, mask=(ranks[:, None] < R) & (outputs[None, :] < N), other=0.0)
        delta = tl.sum(shrunk[:, None] * b.to(tl.float32), axis=0) * tl.load(scaling_ptr + slot).to(tl.float32)
        y_offsets = token * y_stride + outputs
        y = tl.load(y_ptr + y_offsets, mask=outputs < N, other=0.0)
        tl.store(y_ptr + y_offsets, (y.to(tl.float32) + delta).to(y.dtype), mask=outputs < N)
