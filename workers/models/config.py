"""What the model code needs from a Hugging Face `config.json` (or a GGUF file's metadata)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvserve.workers.models.gguf_checkpoint import config_dict, gguf_file
from kvserve.workers.models.quant_config import QuantConfig

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
# A GGUF file's config names no architecture, only its model type.
ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Attention is always full: a Mistral `sliding_window` is not applied, so such a model is
    exact only for contexts up to its window."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # the non-default rope type's parameters, with `rope_type`
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    torch_dtype: torch.dtype | None
    quantization: QuantConfig | None = None

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "ModelConfig":
        """From a checkpoint folder's config.json, or the metadata of the GGUF file `path` names."""
        gguf = gguf_file(path)
        if gguf is not None:
            return cls.from_dict(config_dict(gguf))
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in model folder {path}")
        return cls.from_dict(json.loads(config_file.read_text()))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        architecture = _architecture(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}: only 'silu'")
        num_heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope(cfg)
        return cls(
            architecture=architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=architecture == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            qk_norm=architecture == "Qwen3ForCausalLM",
            eos_token_ids=_int_tuple(cfg.get("eos_token_id")),
            torch_dtype=DTYPES.get(cfg.get("dtype") or cfg.get("torch_dtype")),
            quantization=QuantConfig.from_hf(cfg.get("quantization_config")),
        )


def _architecture(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures") or [ARCHITECTURE_OF_MODEL_TYPE.get(model_type, model_type)]
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise ValueError(
        f"unsupported architecture {architectures!r}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    params.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return float(theta), {"rope_type": rope_type, **params}


def _int_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)
