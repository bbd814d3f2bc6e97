"""A GGUF checkpoint (llama.cpp's one-file format): the file a model path names, its config and
tokenizer as transformers reads them from the file's metadata, and its tensors under Hugging
Face names, dequantized to float32."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
IN_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_file(model: str | Path) -> Path | None:
    """The GGUF file that the model path `model` names: itself, or the one in a folder that has
    no config.json; None for a Hugging Face folder."""
    path = Path(model)
    if path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"model folder {path} holds several GGUF files ({', '.join(f.name for f in files)}); "
                         "name the one to serve")
    return files[0] if files else None


def tokenizer_args(model: str | Path) -> dict[str, str | None]:
    """The arguments of transformers' `from_pretrained` naming the tokenizer of the model path
    `model`: its folder, and the GGUF file whose metadata holds it (`gguf_file`) if any."""
    file = gguf_file(model)
    if file is None:
        return {"pretrained_model_name_or_path": str(model), "gguf_file": None}
    return {"pretrained_model_name_or_path": str(file.parent), "gguf_file": file.name}


def config_dict(file: Path) -> dict[str, Any]:
    """The Hugging Face config of a GGUF file, as transformers reads it from the metadata."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True).to_dict()


def read_tensors(file: Path, rotary_heads: tuple[int, int] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) of every tensor in `file`. With `rotary_heads` (the
    query and key head counts of a Llama-family file), the query and key projections' rows go
    back from llama.cpp's interleaved rotary halves to Hugging Face's order."""
    # Imported here: a machine serving safetensors checkpoints alone need not have `gguf`.
    from gguf import GGUFReader

    from kvserve.workers.models.gguf_quants import dequantize

    for tensor in GGUFReader(file).tensors:
        data = torch.from_numpy(np.array(tensor.data).view(np.uint8).reshape(-1))
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest-varying dim first
        values = dequantize(data, tensor.tensor_type, shape)
        name = hf_name(tensor.name)
        if rotary_heads is not None and ".self_attn.q_proj." in name:
            values = _halves_in_order(values, rotary_heads[0])
        elif rotary_heads is not None and ".self_attn.k_proj." in name:
            values = _halves_in_order(values, rotary_heads[1])
        yield name, values


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    module, suffix = gguf_name.rsplit(".", 1)
    if module in TOP_LEVEL:
        return f"{TOP_LEVEL[module]}.{suffix}"
    block, layer, kind = module.split(".")
    if block != "blk" or kind not in IN_LAYER:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a GGUF file of a supported architecture")
    return f"model.layers.{layer}.{IN_LAYER[kind]}.{suffix}"


def _halves_in_order(values: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's permutation, which interleaves each head's two rotary halves."""
    return values.reshape(heads, -1, 2, *values.shape[1:]).transpose(1, 2).reshape(values.shape)
