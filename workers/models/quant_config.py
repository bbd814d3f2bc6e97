"""What a checkpoint's `quantization_config` says about each linear layer's weights."""

import re
from dataclasses import dataclass
from typing import Any, Literal

CheckpointFormat = Literal["compressed-tensors", "gptq", "awq", "gguf"]


@dataclass(frozen=True)
class IntScheme:
    """Integer weights, activations kept in the serving dtype. `group_size` None: one group
    per output row (a per-channel scale). A `symmetric` compressed-tensors checkpoint stores
    no zero points."""

    bits: int
    group_size: int | None
    act_order: bool = False
    symmetric: bool = False


@dataclass(frozen=True)
class Fp8Scheme:
    """e4m3 weights with a scale per tensor or per output row; `activations` None keeps
    them in the serving dtype (weight-only)."""

    per_channel: bool
    activations: Literal["dynamic", "static"] | None


Scheme = IntScheme | Fp8Scheme


@dataclass(frozen=True)
class QuantConfig:
    checkpoint_format: CheckpointFormat
    groups: tuple[tuple[tuple[str, ...], Scheme], ...]  # (targets, scheme), first match wins
    ignore: tuple[str, ...] = ()
    gptq_zeros_offset: int = 0  # GPTQ (v1) stores each zero point minus one

    @classmethod
    def from_hf(cls, config: dict[str, Any] | None) -> "QuantConfig | None":
        """From config.json's `quantization_config`; None for an unquantized checkpoint."""
        if not config:
            return None
        method = config.get("quant_method")
        if method == "compressed-tensors":
            return _compressed_tensors(config)
        if method == "gptq":
            return _gptq(config)
        if method == "awq":
            return _awq(config)
        raise ValueError(f"unsupported quant_method {method!r}; supported: compressed-tensors, gptq, awq")

    def scheme_for(self, module_name: str) -> Scheme | None:
        """The scheme of the checkpoint's linear layer `module_name` (as `model.layers.0.mlp.up_proj`)."""
        if any(_matches(pattern, module_name) for pattern in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(target == "Linear" or _matches(target, module_name) for target in targets):
                return scheme
        return None


def _matches(pattern: str, module_name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module_name) is not None
    return module_name == pattern or module_name.endswith("." + pattern)


def _compressed_tensors(config: dict[str, Any]) -> QuantConfig:
    groups = tuple(
        (tuple(group["targets"]), _compressed_tensors_scheme(name, group))
        for name, group in config["config_groups"].items()
    )
    return QuantConfig("compressed-tensors", groups, tuple(config.get("ignore") or ()))


def _compressed_tensors_scheme(name: str, group: dict[str, Any]) -> Scheme:
    weights, inputs = group.get("weights"), group.get("input_activations")
    if not weights or group.get("output_activations"):
        raise ValueError(f"compressed-tensors group {name!r}: only weight and input quantization are supported")
    strategy = weights["strategy"]
    if weights["type"] == "float" and weights["num_bits"] == 8 and strategy in ("tensor", "channel"):
        return Fp8Scheme(strategy == "channel", _fp8_activations(name, inputs))
    if weights["type"] == "int" and weights["num_bits"] in (4, 8) and strategy in ("group", "channel") and not inputs:
        group_size = weights["group_size"] if strategy == "group" else None
        act_order = weights.get("actorder") in ("group", "weight")
        return IntScheme(weights["num_bits"], group_size, act_order, weights.get("symmetric", True))
    raise ValueError(
        f"compressed-tensors group {name!r}: unsupported scheme (weights {weights}, inputs {inputs}); supported: "
        "FP8 weights per tensor or channel, int4/int8 weight-only per group or channel"
    )


def _fp8_activations(name: str, inputs: dict[str, Any] | None) -> Literal["dynamic", "static"] | None:
    if not inputs:
        return None
    if inputs["type"] == "float" and inputs["num_bits"] == 8:
        if inputs.get("dynamic") and inputs["strategy"] == "token":
            return "dynamic"
        if not inputs.get("dynamic") and inputs["strategy"] == "tensor":
            return "static"
    raise ValueError(
        f"compressed-tensors group {name!r}: unsupported input activations {inputs}; supported: FP8 dynamic per "
        "token, FP8 static per tensor"
    )


def _int_bits(method: str, config: dict[str, Any]) -> tuple[int, int | None]:
    bits, group_size = config["bits"], config.get("group_size", -1)
    if bits not in (4, 8):
        raise ValueError(f"{method}: unsupported bits {bits}; supported: 4, 8")
    return bits, (None if group_size == -1 else group_size)


def _gptq(config: dict[str, Any]) -> QuantConfig:
    bits, group_size = _int_bits("gptq", config)
    scheme = IntScheme(bits, group_size, bool(config.get("desc_act")))
    offset = 0 if config.get("checkpoint_format") == "gptq_v2" else 1
    return QuantConfig("gptq", ((("Linear",), scheme),), ("lm_head",), offset)


def _awq(config: dict[str, Any]) -> QuantConfig:
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"awq: unsupported version {version!r}; supported: gemm")
    bits, group_size = _int_bits("awq", config)
    if bits != 4:
        raise ValueError(f"awq: unsupported bits {bits}; supported: 4")
    if not config.get("zero_point", True):
        raise ValueError("awq: only checkpoints with zero points (zero_point: true) are supported")
    ignore = ("lm_head", *(config.get("modules_to_not_convert") or ()))
    return QuantConfig("awq", ((("Linear",), IntScheme(4, group_size)),), ignore)
