"""Triton kernels with the signatures and semantics of `quant_reference`, for the GPU path.

`int_linear` multiplies by packed integer weights, unpacking and scaling each tile in registers;
`fp8_linear` runs `torch._scaled_mm` where the GPU has FP8 matmuls (compute capability 8.9 and
up) and a Triton kernel elsewhere. Both kernels also run under Triton's interpreter
(`TRITON_INTERPRET=1`) on CPU tensors, which is how the tests check them on a machine without a GPU.
"""

import torch
import triton
import triton.language as tl

from kvserve.kernels.quant_reference import dequantize_fp8, dequantize_int, fp8_activation_scales, quantize_fp8
from kvserve.kernels.triton_ops import exact_dot

__all__ = ["dequantize_fp8", "dequantize_int", "fp8_activation_scales", "fp8_linear", "int_linear"]

DECODE_TOKENS = 16  # up to this many tokens a step is weight-bound: small row tiles, long input tiles


def int_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    rows = _rows(x)
    (tokens, in_features), out_features = rows.shape, qweight.shape[0]
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = _tiles(tokens, in_features)
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(out_features, block_n))
    _int_matmul_kernel[grid](
        rows, qweight, scales, zeros, qweight if g_idx is None else g_idx, out,
        tokens, out_features, in_features,
        rows.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None,
        # A tile's inputs all in one group: one scale and zero per output row of the tile.
        TILE_IN_ONE_GROUP=g_idx is None and group_size % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out.view(*x.shape[:-1], out_features)


@triton.jit
def _int_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr,
    M, N, K, x_stride, qweight_stride, scales_stride, zeros_stride, out_stride,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, TILE_IN_ONE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        words = tl.load(qweight_ptr + cols[None, :] * qweight_stride + (ks // PER_WORD)[:, None], mask=w_mask, other=0)
        codes = (words >> ((ks % PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)  # [BLOCK_K, BLOCK_N]
        if TILE_IN_ONE_GROUP:
            group = start // GROUP_SIZE
            scale = tl.load(scales_ptr + cols * scales_stride + group, mask=col_mask, other=0.0)[None, :]
            zero = tl.load(zeros_ptr + cols * zeros_stride + group, mask=col_mask, other=0)[None, :]
        else:
            if HAS_G_IDX:
                groups = tl.load(g_idx_ptr + ks, mask=k_mask, other=0)
            else:
                groups = ks // GROUP_SIZE
            scale = tl.load(scales_ptr + cols[None, :] * scales_stride + groups[:, None], mask=w_mask, other=0.0)
            zero = tl.load(zeros_ptr + cols[None, :] * zeros_stride + groups[:, None], mask=w_mask, other=0)
        weight = ((codes - zero.to(tl.int32)).to(tl.float32) * scale).to(x.dtype)
        acc += exact_dot(x, weight)
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    quantize_input: bool,
) -> torch.Tensor:
    """x @ weight.T with e4m3 weights scaled per row; activations quantized to e4m3 first when
    `quantize_input` (per token, or by the static `input_scale`)."""
    rows = _rows(x)
    if not quantize_input:
        out = _fp8_matmul(rows, None, weight, weight_scale, x.dtype)
    else:
        scales = fp8_activation_scales(rows, input_scale).contiguous()
        quantized = quantize_fp8(rows, scales)
        if has_scaled_mm(rows, weight):
            out = torch._scaled_mm(quantized, weight.T, scale_a=scales, scale_b=weight_scale.view(1, -1),
                                   out_dtype=x.dtype)
        else:
            out = _fp8_matmul(quantized, scales, weight, weight_scale, x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


def has_scaled_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._scaled_mm` takes this product with a scale per token and per row: FP8
    tensor cores (8.9 and up), bfloat16 out, both dimensions of the weight multiples of 16."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or weight.shape[0] % 16 or weight.shape[1] % 16:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 9)


def _fp8_matmul(a, a_scales, weight, weight_scale, dtype):
    """(a * a_scales) @ (weight * weight_scale).T with a in e4m3 (per-token `a_scales`) or
    already in `dtype` (`a_scales` None)."""
    (tokens, in_features), out_features = a.shape, weight.shape[0]
    out = torch.empty(tokens, out_features, dtype=dtype, device=a.device)
    block_m, block_n, block_k = _tiles(tokens, in_features)
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(out_features, block_n))
    _fp8_matmul_kernel[grid](
        a, weight, weight_scale if a_scales is None else a_scales, weight_scale, out,
        tokens, out_features, in_features, a.stride(0), weight.stride(0), out.stride(0),
        A_SCALED=a_scales is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


@triton.jit
def _fp8_matmul_kernel(
    a_ptr, w_ptr, a_scales_ptr, w_scales_ptr, out_ptr, M, N, K, a_stride, w_stride, out_stride,
    A_SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    compute = out_ptr.dtype.element_ty  # e4m3 values are exact in float16, bfloat16 and float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * a_stride + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * w_stride + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += exact_dot(a.to(compute), w.to(compute))
    acc *= tl.load(w_scales_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if A_SCALED:
        acc *= tl.load(a_scales_ptr + rows, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _tiles(tokens: int, in_features: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): for a decode, row tiles of the smallest a dot takes and long
    input tiles, many programs along the outputs; for a prefill, square tiles."""
    if tokens <= DECODE_TOKENS:
        return 16, 32, min(128, max(16, triton.next_power_of_2(in_features)))
    return 64, 64, min(64, max(16, triton.next_power_of_2(in_features)))
