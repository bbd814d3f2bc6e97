"""Quantized linear layers in plain PyTorch: the CPU path and the ground truth for the Triton
kernels in `quant_triton.py`.

Integer weights are unsigned codes of `bits` bits, packed 32 // bits to an int32 along the input
dimension (code k of a row in word k // (32 // bits), at bit bits * (k % (32 // bits))), with
a float32 scale and a uint8 zero code per group of `group_size` inputs: w = (code - zero) * scale.
`g_idx`, when given, names each input's group instead (GPTQ's activation order).

FP8 weights are e4m3 with a float32 scale per output row; activations are quantized to e4m3
per token (dynamic) or with one static scale, or not at all (weight-only). `input_scale` is
the static scale, or scales per token worked out by the caller (over all tensor-parallel ranks).
"""

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] unsigned codes -> [rows, cols * bits / 32] int32 words."""
    per_word = 32 // bits
    rows, cols = codes.shape
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    words = (codes.to(torch.int64).view(rows, cols // per_word, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] int32 words -> [rows, n * 32 / bits] unsigned codes (uint8)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2).to(torch.uint8)


def dequantize_int(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The [out, in] weight in `dtype`, computed in float32 (exact for float32 scales)."""
    codes = unpack_codes(qweight, bits)
    if g_idx is None:
        group = torch.arange(codes.shape[1], device=codes.device) // group_size
    else:
        group = g_idx.long()
    centered = codes.to(torch.int32) - zeros[:, group].to(torch.int32)
    return (centered.to(torch.float32) * scales[:, group]).to(dtype)


def int_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    return F.linear(x, dequantize_int(qweight, scales, zeros, g_idx, bits, group_size, x.dtype))


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.to(torch.float32) * weight_scale.unsqueeze(-1)).to(dtype)


def fp8_activation_scales(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """[T, 1] float32 scales: `input_scale` (one static scale, or one per token), or each
    token's largest magnitude over e4m3's max."""
    if input_scale is not None:
        return input_scale.reshape(-1, 1).expand(x.shape[0], 1)
    scales = x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX
    return scales.masked_fill_(scales == 0, torch.finfo(torch.float32).eps)


def quantize_fp8(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (x.float() / scales).clamp_(-FP8_MAX, FP8_MAX).to(FP8)  # torch's cast overflows to NaN


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    quantize_input: bool,
) -> torch.Tensor:
    """x @ weight.T with both dequantized first, as compressed-tensors' fake quantization does."""
    if quantize_input:
        scales = fp8_activation_scales(x, input_scale)
        x = (quantize_fp8(x, scales).float() * scales).to(x.dtype)
    return F.linear(x, dequantize_fp8(weight, weight_scale, x.dtype))
