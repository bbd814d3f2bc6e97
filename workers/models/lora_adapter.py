"""A PEFT LoRA adapter folder (`adapter_config.json`, `adapter_model.safetensors`) read for our
decoder: its settings checked against the model and the engine's rank limit, its A and B
tensors keyed by our layers and the part of a merged layer each adapts.

Every problem is a ValueError starting `lora_modules.<name>:`, the config key that named it."""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.loader import STACKED

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ATTENTION_TARGETS, MLP_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
# PEFT settings that change what the adapter computes, and the value under which we compute it.
_UNSUPPORTED = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}}

LayerKey = tuple[str, int]  # (our module, e.g. "layers.3.self_attn.qkv_proj"; its part in a merged layer)


@dataclass(frozen=True)
class LoRAAdapter:
    name: str
    rank: int
    scaling: float
    # our module (`layers.3.self_attn.qkv_proj`) -> its part -> (A [rank, in], B [out, rank])
    weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]


def check_adapter(name: str, folder: str | Path, model: ModelConfig, max_rank: int) -> None:
    """Raise ValueError if `folder` is not a LoRA adapter of `model` within `max_rank`; reads
    the config and the tensors' names and shapes only."""
    _adapter_settings(name, Path(folder), max_rank)
    with safe_open(Path(folder) / WEIGHTS_FILE, "pt") as tensors:
        for key in tensors.keys():
            _layer_key(name, key, tuple(tensors.get_slice(key).get_shape()), model)


def read_adapter(name: str, folder: str | Path, model: ModelConfig, max_rank: int) -> LoRAAdapter:
    rank, scaling = _adapter_settings(name, Path(folder), max_rank)
    pairs: dict[LayerKey, dict[str, torch.Tensor]] = {}
    with safe_open(Path(folder) / WEIGHTS_FILE, "pt") as tensors:
        for key in tensors.keys():
            tensor = tensors.get_tensor(key)
            layer_key, which = _layer_key(name, key, tuple(tensor.shape), model)
            pairs.setdefault(layer_key, {})[which] = tensor
    incomplete = [f"{module} part {part}" for (module, part), pair in pairs.items() if len(pair) != 2]
    if incomplete:
        raise ValueError(f"lora_modules.{name}: lora_A or lora_B missing for {', '.join(incomplete)}")
    weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (module, part), pair in pairs.items():
        weights.setdefault(module, {})[part] = pair["A"], pair["B"]
    return LoRAAdapter(name, rank, scaling, weights)


def _adapter_settings(name: str, folder: Path, max_rank: int) -> tuple[int, float]:
    """(rank, scaling) from the adapter's config, after checking what we support."""
    where = f"lora_modules.{name}"
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / file).is_file():
            raise ValueError(f"{where}: {folder} has no {file} (not a PEFT LoRA adapter folder)")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    if settings.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {settings['peft_type']!r} is not LORA")
    for key, plain in _UNSUPPORTED.items():
        if settings.get(key) not in (plain, None):
            raise ValueError(f"{where}: {key} {settings[key]!r} is not supported (only {plain!r})")
    targets = settings.get("target_modules") or []
    unknown = [t for t in targets if t not in ATTENTION_TARGETS + MLP_TARGETS] if isinstance(targets, list) else []
    if unknown:
        raise ValueError(f"{where}: target modules {', '.join(unknown)} are not in the model's decoder layers "
                         f"(supported: {', '.join(ATTENTION_TARGETS + MLP_TARGETS)})")
    rank = settings["r"]
    if rank > max_rank:
        raise ValueError(f"{where}: rank {rank} exceeds max_lora_rank {max_rank}")
    alpha = settings.get("lora_alpha", rank)
    return rank, alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def _layer_key(name: str, key: str, shape: tuple[int, ...], model: ModelConfig) -> tuple[LayerKey, str]:
    """Our layer and part for a PEFT tensor name, and which of A and B it is; its shape checked."""
    match = _KEY.fullmatch(key)
    if match is None or match[3] not in (ATTENTION_TARGETS if match[2] == "self_attn" else MLP_TARGETS):
        raise ValueError(f"lora_modules.{name}: tensor {key} adapts no decoder projection of the model "
                         f"(q/k/v/o_proj, gate/up/down_proj)")
    layer, block, target, which = int(match[1]), match[2], match[3], match[4]
    if layer >= model.num_layers:
        raise ValueError(f"lora_modules.{name}: tensor {key} is for layer {layer}; the model has {model.num_layers}")
    in_features, out_features = _projection_shape(target, model)
    rank = shape[0] if which == "A" else shape[1]
    expected = (rank, in_features) if which == "A" else (out_features, rank)
    if shape != expected:
        raise ValueError(f"lora_modules.{name}: tensor {key} has shape {list(shape)}, the model needs {list(expected)} "
                         f"(an adapter of another base model?)")
    module, part = STACKED.get(target, (target, 0))
    return (f"layers.{layer}.{block}.{module}", part), which


def _projection_shape(target: str, model: ModelConfig) -> tuple[int, int]:
    """(inputs, outputs) of a checkpoint projection of `model`."""
    hidden, heads, kv = model.hidden_size, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    return {
        "q_proj": (hidden, heads), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (heads, hidden),
        "gate_proj": (hidden, model.intermediate_size), "up_proj": (hidden, model.intermediate_size),
        "down_proj": (model.intermediate_size, hidden),
    }[target]
