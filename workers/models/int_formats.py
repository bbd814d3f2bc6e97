"""The integer checkpoint layouts (compressed-tensors `pack-quantized`, GPTQ, AWQ GEMM) mapped
onto the one layout our kernels read (see `kvserve.kernels.quant_reference`): unsigned codes
packed along the inputs, [out, groups] float32 scales and uint8 zero codes."""

import torch

from kvserve.kernels.quant_reference import pack_codes, unpack_codes
from kvserve.workers.models.linear_methods import IGNORED, TensorSpec
from kvserve.workers.models.quant_config import IntScheme

# AWQ's GEMM packing puts columns 0, 2, 4, 6, 1, 3, 5, 7 of each eight in a word's nibbles 0..7.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNDO = tuple(AWQ_ORDER.index(column) for column in range(8))


def int_tensor_specs(checkpoint_format: str, scheme: IntScheme, zeros_offset: int) -> dict[str, TensorSpec]:
    per_word = 32 // scheme.bits
    # Scales of every group on every rank when a rank's inputs do not map onto whole groups.
    groups = None if scheme.group_size is None or scheme.act_order else scheme.group_size
    if checkpoint_format == "compressed-tensors":
        return _compressed_tensors(scheme, per_word, groups)
    if checkpoint_format == "gptq":
        return _gptq(scheme, per_word, groups, zeros_offset)
    if checkpoint_format == "awq":
        return _awq(scheme, per_word, groups)
    raise ValueError(f"no integer layout for checkpoint format {checkpoint_format!r}")


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32)


def _compressed_tensors(scheme: IntScheme, per_word: int, groups: int | None) -> dict[str, TensorSpec]:
    """Codes (value + 2**(bits-1)) packed along the inputs as ours; zero points packed the same
    way along the outputs."""

    def zero_codes(packed: torch.Tensor) -> torch.Tensor:
        return unpack_codes(packed.T.contiguous(), scheme.bits).T

    specs = {
        "weight_packed": TensorSpec("qweight", out=(0, 1), inputs=(1, per_word)),
        "weight_scale": TensorSpec("scales", out=(0, 1), inputs=groups and (1, groups), convert=_float32),
        "weight_shape": IGNORED,
    }
    if not scheme.symmetric:
        specs["weight_zero_point"] = TensorSpec("zeros", out=(0, per_word), inputs=groups and (1, groups),
                                                convert=zero_codes)
    if scheme.act_order:
        specs["weight_g_idx"] = TensorSpec("g_idx", out=None, inputs=(0, 1), convert=_int32, shared=True)
    return specs


def _gptq(scheme: IntScheme, per_word: int, groups: int | None, zeros_offset: int) -> dict[str, TensorSpec]:
    """qweight [in / per_word, out], codes packed along the inputs; qzeros [groups, out / per_word]."""

    def codes(qweight: torch.Tensor) -> torch.Tensor:
        return pack_codes(unpack_codes(qweight.T.contiguous(), scheme.bits), scheme.bits)

    def zero_codes(qzeros: torch.Tensor) -> torch.Tensor:
        return (unpack_codes(qzeros, scheme.bits) + zeros_offset).T

    specs = {
        "qweight": TensorSpec("qweight", out=(1, 1), inputs=(0, per_word), convert=codes),
        "qzeros": TensorSpec("zeros", out=(1, per_word), inputs=groups and (0, groups), convert=zero_codes),
        "scales": TensorSpec("scales", out=(1, 1), inputs=groups and (0, groups), convert=_transposed_float32),
    }
    g_idx = TensorSpec("g_idx", out=None, inputs=(0, 1), convert=_int32, shared=True)
    specs["g_idx"] = g_idx if scheme.act_order else IGNORED
    return specs


def _awq(scheme: IntScheme, per_word: int, groups: int | None) -> dict[str, TensorSpec]:
    """qweight [in, out / 8] and qzeros [groups, out / 8], packed along the outputs in AWQ_ORDER."""

    def natural(packed: torch.Tensor) -> torch.Tensor:
        nibbles = unpack_codes(packed, 4)
        return nibbles.view(*packed.shape, 8)[..., AWQ_UNDO].flatten(-2)

    def codes(qweight: torch.Tensor) -> torch.Tensor:
        return pack_codes(natural(qweight).T.contiguous(), 4)

    return {
        "qweight": TensorSpec("qweight", out=(1, per_word), inputs=(0, 1), convert=codes),
        "qzeros": TensorSpec("zeros", out=(1, per_word), inputs=groups and (0, groups), convert=lambda z: natural(z).T),
        "scales": TensorSpec("scales", out=(1, 1), inputs=groups and (0, groups), convert=_transposed_float32),
    }


def _transposed_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.T.to(torch.float32)


def _int32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.int32)
