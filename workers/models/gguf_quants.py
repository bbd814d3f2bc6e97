"""GGML's tensor types decoded to float32 in PyTorch, in the same float32 operations as
`gguf.quants.dequantize`, so to the same bits: F32, F16, BF16, Q8_0, Q4_0 and the K-quants
Q4_K, Q5_K, Q6_K (of which llama.cpp's Q4_K_M files are made).

Each quantized type stores blocks of values: a float16 scale (and for K-quants sub-block scales
and minimums) followed by the codes. Within a byte, low nibbles come before high ones."""

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

SUPPORTED = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K)


def dequantize(data: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of `shape` that the bytes `data` (uint8, flat) encode as `ggml_type`."""
    if ggml_type not in SUPPORTED:
        names = ", ".join(t.name for t in SUPPORTED)
        raise ValueError(f"GGUF tensor type {T(ggml_type).name} is not supported; supported: {names}")
    block_values, block_bytes = GGML_QUANT_SIZES[ggml_type]
    blocks = data.view(-1, block_bytes)
    return _DECODERS[ggml_type](blocks).reshape(shape)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n]: the low nibbles, then the high ones."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    scale, codes = _f16(blocks[:, :2]), blocks[:, 2:].contiguous().view(torch.int8)
    return codes.float() * scale


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    scale = _f16(blocks[:, :2])
    codes = _nibbles(blocks[:, 2:]).flatten(1).to(torch.int8) - 8
    return scale * codes.float()


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit sub-block scales and minimums of Q4_K/Q5_K from their 12 bytes: bytes 0-3
    hold scales 0-3 and bytes 4-7 minimums 0-3 in their low six bits; bytes 8-11 hold the low
    four bits of scales 4-7 (low nibble) and minimums 4-7 (high nibble), whose top two bits are
    the top bits of bytes 0-3 and 4-7."""
    first, second, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((first & 0x3F, (rest & 0x0F) | ((first >> 2) & 0x30)), dim=1)
    minimums = torch.cat((second & 0x3F, (rest >> 4) | ((second >> 2) & 0x30)), dim=1)
    return scales.float(), minimums.float()


def _k_quant(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K values from their header and the [n, 8, 32] codes of their sub-blocks."""
    scale, minimum = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sub_scales, sub_minimums = _k_scales(blocks[:, 4:16])
    step = (scale * sub_scales).unsqueeze(-1)
    offset = (minimum * sub_minimums).unsqueeze(-1)
    return (step * codes.float() - offset).flatten(1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # Each 32 bytes of codes hold two sub-blocks: the first in low nibbles, the next in high ones.
    return _k_quant(blocks, _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).view(-1, 8, 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    low = _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).view(-1, 8, 32)
    # Bit j of high-bit byte i is the fifth bit of value i of sub-block j.
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).view(1, 8, 1)
    high = (blocks[:, 16:48].unsqueeze(1) >> shifts) & 1
    return _k_quant(blocks, low | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Two halves of 128 values: 64 bytes of low nibbles, 32 of high bit pairs per half, then
    16 int8 sub-block scales (one per 16 values) and a float16 scale."""
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).view(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    codes = (low | (high << 4)).to(torch.int8) - 32
    sub_scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    step = (_f16(blocks[:, 208:210]) * sub_scales).unsqueeze(-1)
    return (step * codes.view(-1, 16, 16).float()).flatten(1)


_DECODERS = {
    T.F32: _f32, T.F16: _f16, T.BF16: _bf16, T.Q8_0: _q8_0, T.Q4_0: _q4_0,
    T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
