"""Builds the model (or one tensor-parallel rank's shard of it) on its device and fills it
from a Hugging Face safetensors checkpoint, reading only the slices that rank holds, or from a
GGUF file, dequantized."""

import contextlib
import functools
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kvserve.kernels import get_ops, get_quant_ops
from kvserve.workers.models.distributed import SINGLE, TPGroup
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.decoder import DecoderForCausalLM
from kvserve.workers.models.gguf_checkpoint import gguf_file, read_tensors
from kvserve.workers.models.linear_methods import BIAS_SPEC, DENSE, IGNORED, Axis, TensorSpec
from kvserve.workers.models.parallel_layers import MergedLinear, ParallelLinear, VocabParallelEmbedding
from kvserve.workers.models.quant_methods import LinearMethods

# Checkpoint projections that we stack into one matmul: (our merged projection, its index).
STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
Target = tuple[str, str, int | None]  # (our module, checkpoint tensor suffix, index within a merged projection)
CheckpointSlice = tuple[int, int, int]  # (dim, start, length)
TensorReader = Callable[[list[CheckpointSlice]], torch.Tensor]  # the tensor, or only these slices of it


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    tp: TPGroup = SINGLE,
    quantization: str = "auto",
) -> tuple[DecoderForCausalLM, ModelConfig]:
    """The model (`tp`'s rank of it) with its weights from `model_dir` (a checkpoint folder, or
    a GGUF file or the folder holding one), or random ones of the same shapes for
    `load_format="dummy"`. A quantized checkpoint keeps its weights quantized
    unless `quantization="dequantize"`, which turns them into `dtype` at load."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"unknown load_format {load_format!r}; expected 'auto' or 'dummy'")
    if quantization not in ("auto", "dequantize"):
        raise ValueError(f"unknown quantization {quantization!r}; expected 'auto' or 'dequantize'")
    config = ModelConfig.from_pretrained_dir(model_dir)
    device = torch.device(device)
    model = _meta_model(config, dtype, device, tp)
    model.materialize(device).requires_grad_(False)
    if load_format == "dummy":
        _init_dummy_weights(model)
    else:
        _fill_defaults(model)
        _load_tensors(model, _checkpoint_tensors(Path(model_dir), config), model_dir)
    if quantization == "dequantize":
        _dequantize_linears(model, dtype)
    return model.eval(), config


def model_bytes(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str) -> int:
    """Bytes that `load_model(model_dir, dtype, device)` allocates on `device` (weights as the
    checkpoint stores them, the rotary table), from a build on the meta device: nothing is
    allocated or read."""
    model = _meta_model(ModelConfig.from_pretrained_dir(model_dir), dtype, torch.device(device), SINGLE)
    return sum(tensor.nbytes for tensor in itertools.chain(model.parameters(), model.buffers()))


def _meta_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TPGroup) -> DecoderForCausalLM:
    """The model for `device`, its tensors on the meta device."""
    methods = LinearMethods(config.quantization, get_quant_ops(device))
    # On the meta device so that no weight is allocated or initialized twice; the default dtype
    # (not `.to(dtype)`) so that quantized weights and float32 scales keep their dtypes.
    with torch.device("meta"), _default_dtype(dtype):
        return DecoderForCausalLM(config, get_ops(device), tp, methods)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _linears(model: DecoderForCausalLM) -> Iterator[tuple[str, ParallelLinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, ParallelLinear))


def _init_dummy_weights(model: DecoderForCausalLM) -> None:
    by_method: set[int] = set()
    for _, layer in _linears(model):
        layer.method.init_dummy(layer)
        by_method.update(id(p) for name, p in layer.named_parameters(recurse=False) if name != "bias")
    for name, param in model.named_parameters():
        if id(param) in by_method:
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(mean=0.0, std=0.02)


def _fill_defaults(model: DecoderForCausalLM) -> None:
    for _, layer in _linears(model):
        for param_name, value in layer.method.defaults().items():
            getattr(layer, param_name).fill_(value)


def _dequantize_linears(model: DecoderForCausalLM, dtype: torch.dtype) -> None:
    for _, layer in _linears(model):
        if layer.method is DENSE:
            continue
        weight = layer.method.dequantized_weight(layer, dtype)
        for param_name, _ in list(layer.named_parameters(recurse=False)):
            if param_name != "bias":
                delattr(layer, param_name)
        layer.method, layer.weight = DENSE, torch.nn.Parameter(weight, requires_grad=False)


def _checkpoint_tensors(model_path: Path, config: ModelConfig) -> Iterator[tuple[str, TensorReader]]:
    gguf = gguf_file(model_path)
    return _safetensors(model_path) if gguf is None else _gguf_tensors(gguf, config)


def _safetensors(model_dir: Path) -> Iterator[tuple[str, TensorReader]]:
    for path in _checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, functools.partial(_read, f, name)


def _gguf_tensors(file: Path, config: ModelConfig) -> Iterator[tuple[str, TensorReader]]:
    # llama.cpp permutes the rotary halves of the Llama family's projections (as transformers undoes).
    llama_family = config.architecture in ("LlamaForCausalLM", "MistralForCausalLM")
    rotary_heads = (config.num_heads, config.num_kv_heads) if llama_family else None
    for name, tensor in read_tensors(file, rotary_heads):
        yield name, functools.partial(_narrow, tensor)


def _load_tensors(model: DecoderForCausalLM, tensors: Iterator[tuple[str, TensorReader]], source: Path) -> None:
    pending = _expected_targets(model)
    for name, read in tensors:
        if _ignored(name, model):
            continue
        target = _target(name)
        module_name, suffix, index = target
        spec = _spec(model, module_name, suffix)
        if spec is IGNORED:
            continue
        if spec is None or target not in pending:
            raise ValueError(f"unexpected or repeated weight {name!r} in {source}")
        pending.remove(target)
        module = model.get_submodule(module_name)
        tensor = spec.convert(read(_checkpoint_slices(module, spec, index, name)))
        others = [part for part in _parts(module, suffix, module_name) if part != target]
        _place(module, spec, index, tensor, name, first=all(part in pending for part in others))
    if pending:
        missing = sorted(f"{m}.{s}[{index}]" if index is not None else f"{m}.{s}" for m, s, index in pending)
        raise ValueError(f"weights missing from the checkpoint in {source}: {', '.join(missing)}")


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({model_dir / name for name in weight_map.values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in model folder {model_dir}")
    return files


def _specs(module: torch.nn.Module) -> dict[str, TensorSpec]:
    """Checkpoint tensor suffix -> where it goes, for every tensor of `module`."""
    if not isinstance(module, ParallelLinear):
        return {name: _plain_spec(module, name) for name, _ in module.named_parameters(recurse=False)}
    specs = dict(module.method.tensor_specs())
    if module.bias is not None:
        specs["bias"] = BIAS_SPEC
    return specs


def _spec(model: DecoderForCausalLM, module_name: str, suffix: str) -> TensorSpec | None:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return _specs(module).get(suffix)


def _plain_spec(module: torch.nn.Module, param_name: str) -> TensorSpec:
    """Norms are read whole; a vocabulary-parallel table is split along its rows."""
    return TensorSpec(param_name, out=(0, 1) if isinstance(module, VocabParallelEmbedding) else None, inputs=None)


def _parts(module: torch.nn.Module, suffix: str, module_name: str) -> list[Target]:
    count = len(module.output_sizes) if isinstance(module, MergedLinear) else 0
    return [(module_name, suffix, index) for index in range(count)]


def _expected_targets(model: DecoderForCausalLM) -> set[Target]:
    targets: set[Target] = set()
    for module_name, module in model.named_modules():
        for suffix, spec in _specs(module).items():
            if spec is IGNORED:
                continue
            targets.update(_parts(module, suffix, module_name) or [(module_name, suffix, None)])
    return targets


def _ignored(name: str, model: DecoderForCausalLM) -> bool:
    # Some tied checkpoints store the head anyway; old ones store the rotary frequencies.
    tied_head = name == "lm_head.weight" and model.config.tie_word_embeddings
    return tied_head or name.endswith("rotary_emb.inv_freq")


def _target(checkpoint_name: str) -> Target:
    module_name, suffix = checkpoint_name.removeprefix("model.").rsplit(".", 1)
    parent, _, leaf = module_name.rpartition(".")
    if leaf in STACKED:
        merged, index = STACKED[leaf]
        return f"{parent}.{merged}", suffix, index
    return module_name, suffix, None


def _checkpoint_slices(module: torch.nn.Module, spec: TensorSpec, index: int | None, name: str) -> list[CheckpointSlice]:
    """The parts of the checkpoint tensor that this rank's share of `module` holds."""
    slices = []
    rows = module.out_slice(index) if isinstance(module, MergedLinear) else _vocab_rows(module)
    if rows is not None and spec.out is not None:
        slices.append(_entries(spec.out, rows, name))
    inputs = module.in_slice() if isinstance(module, ParallelLinear) else None
    if inputs is not None and spec.inputs is not None:
        slices.append(_entries(spec.inputs, inputs, name))
    return slices


def _vocab_rows(module: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(module, VocabParallelEmbedding) and module.tp.size > 1:
        return module.vocab_start, module.num_vocab_rows
    return None


def _entries(axis: Axis, span: tuple[int, int], name: str) -> CheckpointSlice:
    dim, per_entry = axis
    start, length = span
    if start % per_entry or length % per_entry:
        raise ValueError(
            f"{name!r}: this rank's range {start}..{start + length} cuts entries of {per_entry} "
            "(packed codes or a quantization group): a tensor-parallel split must not cut a group"
        )
    return dim, start // per_entry, length // per_entry


def _read(f, name: str, slices: list[CheckpointSlice]) -> torch.Tensor:
    """The whole tensor, or only `slices` of it from the file."""
    if not slices:
        return f.get_tensor(name)
    tensor = f.get_slice(name)
    index = [slice(None)] * len(tensor.get_shape())
    for dim, start, length in slices:
        index[dim] = slice(start, start + length)
    return tensor[tuple(index)]


def _narrow(tensor: torch.Tensor, slices: list[CheckpointSlice]) -> torch.Tensor:
    for dim, start, length in slices:
        tensor = tensor.narrow(dim, start, length)
    return tensor


def _place(module, spec: TensorSpec, index: int | None, tensor: torch.Tensor, name: str, first: bool) -> None:
    """Copies `tensor` to its parameter (part `index`'s rows of it in a merged layer)."""
    destination = getattr(module, spec.param)
    if spec.shared:
        if not first and not torch.equal(destination, tensor.to(destination.dtype).reshape(destination.shape)):
            raise ValueError(f"{name!r} differs from the other projections merged with it; they must be equal")
    elif index is not None:
        destination = destination.narrow(0, *module.rows_of_part(index))
    elif isinstance(module, VocabParallelEmbedding):
        destination = destination.narrow(0, 0, module.num_vocab_rows)  # the rest pads the vocabulary
    if spec.out is None and not spec.shared and tensor.numel() == 1:
        destination.fill_(tensor.item())  # one scale for all the rows
        return
    if destination.shape != tensor.shape:
        raise ValueError(
            f"weight {name!r} has shape {tuple(tensor.shape)}; the model expects {tuple(destination.shape)}"
        )
    destination.copy_(tensor)
