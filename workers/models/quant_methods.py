"""Quantized linear methods (FP8, packed integers) and the choice of a method for each layer."""

from types import ModuleType

import torch
from torch import nn
from torch.distributed import ReduceOp

from kvserve.workers.models.int_formats import int_tensor_specs
from kvserve.workers.models.linear_methods import DENSE, LinearMethod, TensorSpec
from kvserve.workers.models.quant_config import Fp8Scheme, IntScheme, QuantConfig


class Fp8Method:
    def __init__(self, scheme: Fp8Scheme, ops: ModuleType):
        self.scheme, self.ops = scheme, ops

    def create_weights(self, layer, in_features, out_features, in_total):
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        # Per row even for per-tensor checkpoints: the parts of a merged layer have their own.
        layer.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32))
        if self.scheme.activations == "static":
            layer.input_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def tensor_specs(self):
        scale_out = (0, 1) if self.scheme.per_channel else None
        specs = {
            "weight": TensorSpec("weight", out=(0, 1), inputs=(1, 1)),
            "weight_scale": TensorSpec("weight_scale", out=scale_out, inputs=None, convert=_flat_float32),
        }
        if self.scheme.activations == "static":
            specs["input_scale"] = TensorSpec("input_scale", out=None, inputs=None, convert=_flat_float32, shared=True)
        return specs

    def defaults(self):
        return {}

    def init_dummy(self, layer):
        layer.weight_scale.fill_(0.02 / 16)
        layer.weight.copy_(torch.randn(layer.weight.shape, device=layer.weight.device).mul_(16))
        if self.scheme.activations == "static":
            layer.input_scale.fill_(0.05)

    def apply(self, layer, x):
        input_scale = self._input_scale(layer, x)
        out = self.ops.fp8_linear(x, layer.weight, layer.weight_scale, input_scale, self.scheme.activations is not None)
        return out if layer.bias is None else out + layer.bias

    def _input_scale(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """The static scale. For dynamic scales of a layer whose inputs are split over ranks, each
        token's over all the ranks' inputs, so that every rank quantizes as one rank would."""
        if self.scheme.activations == "static":
            return layer.input_scale
        if self.scheme.activations == "dynamic" and layer.in_slice() is not None:
            return layer.tp.all_reduce(self.ops.fp8_activation_scales(x, None), op=ReduceOp.MAX)
        return None

    def dequantized_weight(self, layer, dtype):
        return self.ops.dequantize_fp8(layer.weight, layer.weight_scale, dtype)


class IntMethod:
    def __init__(self, scheme: IntScheme, ops: ModuleType, specs: dict[str, TensorSpec]):
        self.scheme, self.ops, self.specs = scheme, ops, specs

    def create_weights(self, layer, in_features, out_features, in_total):
        scheme = self.scheme
        per_word = 32 // scheme.bits
        # With one group per row, this rank's inputs are that group (of the scale read whole).
        layer.group_size = scheme.group_size or in_features
        if in_features % per_word or (not scheme.act_order and in_features % layer.group_size):
            raise ValueError(
                f"a layer with {in_features} inputs per rank cannot hold whole {scheme.bits}-bit words and "
                f"groups of {layer.group_size}: a tensor-parallel split must not cut a group"
            )
        if scheme.group_size is None:
            groups = 1
        else:
            groups = (in_total if scheme.act_order else in_features) // scheme.group_size
        layer.qweight = nn.Parameter(torch.empty(out_features, in_features // per_word, dtype=torch.int32),
                                     requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(out_features, groups, dtype=torch.float32))
        layer.zeros = nn.Parameter(torch.empty(out_features, groups, dtype=torch.uint8), requires_grad=False)
        g_idx = nn.Parameter(torch.empty(in_features, dtype=torch.int32), requires_grad=False)
        layer.register_parameter("g_idx", g_idx if scheme.act_order else None)

    def tensor_specs(self):
        return self.specs

    def defaults(self):
        # Symmetric checkpoints store no zero points: the middle code is zero.
        return {} if "zeros" in {s.param for s in self.specs.values()} else {"zeros": 2 ** (self.scheme.bits - 1)}

    def init_dummy(self, layer):
        levels = 2**self.scheme.bits
        layer.qweight.random_()
        layer.scales.fill_(0.02 * 12**0.5 / levels)  # uniform codes have a std of levels / sqrt(12)
        layer.zeros.fill_(levels // 2)
        if layer.g_idx is not None:
            layer.g_idx.copy_(torch.arange(layer.g_idx.numel(), device=layer.g_idx.device) % layer.scales.shape[1])

    def apply(self, layer, x):
        out = self.ops.int_linear(
            x, layer.qweight, layer.scales, layer.zeros, layer.g_idx, self.scheme.bits, layer.group_size
        )
        return out if layer.bias is None else out + layer.bias

    def dequantized_weight(self, layer, dtype):
        return self.ops.dequantize_int(
            layer.qweight, layer.scales, layer.zeros, layer.g_idx, self.scheme.bits, layer.group_size, dtype
        )


def _flat_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).to(torch.float32)


class LinearMethods:
    """The method of each linear layer of a checkpoint quantized as `config` says (dense without one)."""

    def __init__(self, config: QuantConfig | None, ops: ModuleType):
        self.config, self.ops = config, ops

    def for_layer(self, checkpoint_names: list[str]) -> LinearMethod:
        """The method of the layer holding the checkpoint's linear layers `checkpoint_names`
        (several for a merged layer: they must agree)."""
        if self.config is None:
            return DENSE
        schemes = {self.config.scheme_for(name) for name in checkpoint_names}
        if len(schemes) > 1:
            raise ValueError(f"{', '.join(checkpoint_names)} are quantized differently; they must agree to merge")
        scheme = schemes.pop()
        if scheme is None:
            return DENSE
        if isinstance(scheme, Fp8Scheme):
            return Fp8Method(scheme, self.ops)
        specs = int_tensor_specs(self.config.checkpoint_format, scheme, self.config.gptq_zeros_offset)
        return IntMethod(scheme, self.ops, specs)
