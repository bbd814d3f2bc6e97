"""How a linear layer holds its weights and multiplies by them, and how each checkpoint tensor
of the layer maps onto those weights: the contract between the layers, the quantized formats
and the loader. The dense method is here; the quantized ones in `quant_methods.py`."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

# (checkpoint dim, how many of the layer's rows or inputs one entry along that dim covers):
# 1 for a plain dim, 8 for int4 codes packed along it, the group size for per-group scales.
Axis = tuple[int, int]


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class TensorSpec:
    """Where one checkpoint tensor of a layer goes. `out` / `inputs` name the checkpoint dims
    along the layer's outputs and inputs (None: the tensor does not vary along them, like a
    per-tensor scale, and is read whole). `convert` turns what is read into the parameter's
    layout. A `shared` tensor is one per layer (a static input scale, GPTQ's g_idx): every
    part of a merged layer must hold the same one."""

    param: str
    out: Axis | None
    inputs: Axis | None
    convert: Callable[[torch.Tensor], torch.Tensor] = _same
    shared: bool = False


class LinearMethod(Protocol):
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, in_total: int) -> None:
        """Registers the layer's parameters for `in_features` of `in_total` checkpoint inputs."""

    def tensor_specs(self) -> dict[str, TensorSpec]:
        """Checkpoint tensor suffix (as `weight`) -> where it goes; the layer's `bias` excluded."""

    def defaults(self) -> dict[str, float]:
        """Parameters not read from the checkpoint, and the value they hold."""

    def init_dummy(self, layer: nn.Module) -> None:
        """Random weights of about the spread of a dense one of std 0.02 (`load_format: dummy`)."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T + bias."""

    def dequantized_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight in `dtype`."""


class DenseMethod:
    def create_weights(self, layer, in_features, out_features, in_total):
        layer.weight = nn.Parameter(torch.empty(out_features, in_features))

    def tensor_specs(self):
        return {"weight": TensorSpec("weight", out=(0, 1), inputs=(1, 1))}

    def defaults(self):
        return {}

    def init_dummy(self, layer):
        layer.weight.normal_(mean=0.0, std=0.02)

    def apply(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)

    def dequantized_weight(self, layer, dtype):
        return layer.weight.to(dtype)


DENSE = DenseMethod()
BIAS_SPEC = TensorSpec("bias", out=(0, 1), inputs=None)
IGNORED = TensorSpec("", out=None, inputs=None)  # a tensor we need not read (compressed-tensors' weight_shape)
