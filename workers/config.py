"""The engine's settings, validated once; the application config in cluster/ embeds it."""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hugging Face checkpoint folder")
    tokenizer: str | None = Field(None, description="tokenizer folder, if not the model's")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_format: Literal["auto", "dummy"] = "auto"
    block_size: int = Field(16, ge=1, le=256)
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = Field(None, ge=1, description="size of the KV pool; derived from kv_cache_memory_gib if unset")
    kv_cache_memory_gib: float = Field(1.0, gt=0, description="KV pool size when num_kv_blocks is unset")
    seed: int = 0
    cpu_threads: int | None = Field(None, ge=1, description="torch threads of this engine (several replicas share a CPU)")
    tp_size: int = Field(1, ge=1, description="tensor-parallel ranks: >1 runs the model on that many worker actors")

    @model_validator(mode="after")
    def _check_device(self) -> "EngineConfig":
        # With tp_size > 1 the worker actors hold the GPUs, not the process that checks this.
        if self.device == "cuda" and self.tp_size == 1 and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
        return self

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """`auto` is the checkpoint's dtype on a GPU and float32 on a CPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.torch_device().type == "cpu" or checkpoint_dtype is None:
            return torch.float32
        return checkpoint_dtype
