"""Builds the model (or one tensor-parallel rank's shard of it) on its device and fills it
from a Hugging Face safetensors checkpoint, reading only the slices that rank holds."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from kvserve.kernels import get_ops
from kvserve.workers.models.distributed import SINGLE, TPGroup
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.decoder import DecoderForCausalLM
from kvserve.workers.models.parallel_layers import CheckpointSlice, MergedLinear

# Checkpoint projections that we stack into one matmul: (our merged projection, its index).
STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
Target = tuple[str, int | None]  # (parameter name, index within a merged projection)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    tp: TPGroup = SINGLE,
) -> tuple[DecoderForCausalLM, ModelConfig]:
    """The model (`tp`'s rank of it) with its weights from `model_dir`, or random ones of the
    same shapes for `load_format="dummy"`."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"unknown load_format {load_format!r}; expected 'auto' or 'dummy'")
    config = ModelConfig.from_pretrained_dir(model_dir)
    device = torch.device(device)
    # Built on the meta device so that no weight is allocated or initialized twice.
    with torch.device("meta"):
        model = DecoderForCausalLM(config, get_ops(device), tp)
    model.to(dtype=dtype).materialize(device).requires_grad_(False)
    if load_format == "dummy":
        _init_dummy_weights(model)
    else:
        _load_safetensors(model, Path(model_dir))
    return model.eval(), config


def _init_dummy_weights(model: DecoderForCausalLM) -> None:
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(mean=0.0, std=0.02)


def _load_safetensors(model: DecoderForCausalLM, model_dir: Path) -> None:
    pending = _expected_targets(model)
    for path in _checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if _ignored(name, model):
                    continue
                target = _target(name)
                if target not in pending:
                    raise ValueError(f"unexpected or repeated weight {name!r} in {path}")
                pending.remove(target)
                _copy(_destination(model, *target), _read(f, name, _checkpoint_slice(model, *target)), name)
    if pending:
        missing = sorted(f"{name}[{index}]" if index is not None else name for name, index in pending)
        raise ValueError(f"weights missing from the checkpoint in {model_dir}: {', '.join(missing)}")


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({model_dir / name for name in weight_map.values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in model folder {model_dir}")
    return files


def _expected_targets(model: DecoderForCausalLM) -> set[Target]:
    targets: set[Target] = set()
    for module_name, module in model.named_modules():
        shards = range(len(module.output_sizes)) if isinstance(module, MergedLinear) else [None]
        for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
            targets.update((param_name, shard) for shard in shards)
    return targets


def _ignored(name: str, model: DecoderForCausalLM) -> bool:
    # Some tied checkpoints store the head anyway; old ones store the rotary frequencies.
    tied_head = name == "lm_head.weight" and model.config.tie_word_embeddings
    return tied_head or name.endswith("rotary_emb.inv_freq")


def _target(checkpoint_name: str) -> Target:
    name = checkpoint_name.removeprefix("model.")
    parts = name.rsplit(".", 2)
    if len(parts) == 3 and parts[1] in STACKED:
        merged, index = STACKED[parts[1]]
        return f"{parts[0]}.{merged}.{parts[2]}", index
    return name, None


def _destination(model: DecoderForCausalLM, param_name: str, index: int | None) -> torch.Tensor:
    param = model.get_parameter(param_name)
    if index is None:
        return param
    sizes = model.get_submodule(param_name.rsplit(".", 1)[0]).output_sizes
    return param.narrow(0, sum(sizes[:index]), sizes[index])


def _checkpoint_slice(model: DecoderForCausalLM, param_name: str, index: int | None) -> CheckpointSlice:
    module = model.get_submodule(param_name.rsplit(".", 1)[0])
    slice_of = getattr(module, "checkpoint_slice", None)
    return slice_of(index) if slice_of is not None else None


def _read(f, name: str, part: CheckpointSlice) -> torch.Tensor:
    """The whole tensor, or only `part` of it from the file."""
    if part is None:
        return f.get_tensor(name)
    dim, start, length = part
    tensor = f.get_slice(name)
    index = [slice(None)] * len(tensor.get_shape())
    index[dim] = slice(start, start + length)
    return tensor[tuple(index)]


def _copy(destination: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if destination.shape != tensor.shape:
        raise ValueError(
            f"weight {name!r} has shape {tuple(tensor.shape)}; the model expects {tuple(destination.shape)}"
        )
    destination.copy_(tensor)
