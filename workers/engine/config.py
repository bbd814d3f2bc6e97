"""The engine's settings, validated once; the application config in cluster/ embeds it.

torch is imported only where a method needs it, so that the CLI can build its flags from these
fields without loading torch."""

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch

    from kvserve.workers.models.config import ModelConfig


class PrefixRetention(BaseModel):
    """A retention priority for every prompt that starts with `prefix_token_ids` (a fixed
    system prompt, say), over those tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix_token_ids: list[int] = Field(min_length=1)
    priority: int = Field(ge=0, le=100)
    duration_s: float | None = Field(None, gt=0, description="then the default priority; unset: for good")


class SpeculativeConfig(BaseModel):
    """Speculative decoding: each step a sequence may verify up to `num_speculative_tokens`
    proposed tokens; `ngram` proposes what followed the latest earlier occurrence of the
    sequence's last `prompt_lookup_max` down to `prompt_lookup_min` tokens (in its prompt or output);
    `draft` runs `model`, a smaller checkpoint with the target's tokenizer, that many steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram", "draft"]
    num_speculative_tokens: int = Field(ge=1, le=32)
    prompt_lookup_min: int = Field(2, ge=1)
    prompt_lookup_max: int = Field(5, ge=1)
    model: str | None = Field(None, description="the draft model's checkpoint folder (method `draft` only)")

    @model_validator(mode="after")
    def _check_lookup_range(self) -> "SpeculativeConfig":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        if (self.method == "draft") != (self.model is not None):
            raise ValueError("speculative.model is needed by method 'draft' and taken by no other")
        return self


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hugging Face checkpoint folder")
    tokenizer: str | None = Field(None, description="tokenizer folder, if not the model's")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when torch sees a GPU, else CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; `auto`: the checkpoint's dtype on a GPU, float32 on a CPU"
    )
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="`auto` reads the checkpoint's weights; `dummy` fills random ones of the same shapes"
    )
    quantization: Literal["auto", "dequantize"] = Field(
        "auto", description="`auto`: weights stay as the checkpoint's `quantization_config` quantized them; "
        "`dequantize`: turned into `dtype` at load (for debugging)"
    )
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV cache block")
    max_model_len: int | None = Field(
        None, ge=1, description="longest sequence, prompt and output; default: the model's max_position_embeddings"
    )
    max_num_seqs: int = Field(256, ge=1, description="sequences running in one step")
    pooling: Literal["last", "mean"] = Field(
        "last", description="how /v1/embeddings pools a prompt's final hidden states: `last` token or `mean`"
    )
    normalize_embeddings: bool = Field(True, description="whether embeddings are L2-normalised")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens computed in one step")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="`fcfs`: requests run in arrival order; `priority`: by the request's `priority` "
        "(lower first), then arrival, and preemption takes the worst priority first"
    )
    max_queue_wait_s: float | None = Field(
        None, gt=0, description="refuse a new request at once (HTTP 503 with Retry-After) when it would wait "
        "longer than this many seconds for its first step: a request it would queue behind has waited longer, or "
        "the requests ahead of it take longer at the pace the queue has been starting them; unset: never refuse "
        "for load"
    )
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of prompt prefixes seen before")
    kv_retention_prefixes: list[PrefixRetention] = Field(
        default_factory=list, description="retention priorities for prompts that start with given tokens"
    )
    kv_offload_gib: float = Field(
        0, ge=0, description="host-memory KV tier (pinned on CUDA) that blocks evicted from the device pool "
        "move to; 0 turns it off"
    )
    num_kv_blocks: int | None = Field(
        None, ge=1, description="size of the KV pool; derived from memory if unset. A draft model "
        "(speculative method `draft`) keeps as many blocks of its own KV cache on top"
    )
    kv_cache_memory_gib: float | None = Field(
        None, gt=0, description="KV pool size when num_kv_blocks is unset; if unset too, sized from "
        "gpu_memory_utilization on CUDA and 1 GiB on a CPU. A draft model's KV cache comes on top"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of the GPU's memory this engine fills: weights, activations, KV pool, "
        "and a draft model's weights and KV cache"
    )
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = Field(
        "auto", description="`auto` stores K/V in the model's dtype; `fp8_e4m3` in FP8 with a scale per layer"
    )
    calculate_kv_scales: bool = Field(
        False, description="FP8 KV scales from a warm-up forward on random tokens instead of 1.0"
    )
    async_scheduling: Literal["auto", "on", "off"] = Field(
        "auto", description="prepare step N+1 on the host while the device runs step N, the sampled tokens "
        "fed back on the device; `auto`: on for CUDA with the model in the engine's process"
    )
    enforce_eager: bool = Field(
        False, description="no CUDA graphs: otherwise decode steps replay them on CUDA with tp_size 1"
    )
    seed: int = Field(0, description="torch's global seed in the engine: dummy weights, and sampling for requests "
                      "without a seed of their own")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads of this engine (several replicas share a CPU)")
    tp_size: int = Field(1, ge=1, description="tensor-parallel ranks: >1 runs the model on that many worker actors")
    rank_cpus: float = Field(
        1.0, gt=0, description="CPUs Ray reserves for each worker actor (rank) when the ranks run on CPUs"
    )
    speculative: SpeculativeConfig | None = Field(
        None, description='speculative decoding, as a JSON object: {"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5} or {"method": "draft", '
        '"model": DIR, "num_speculative_tokens": 4}; unset: off'
    )
    distributed_executor_backend: Literal["auto", "ray"] = Field(
        "auto", description="`auto`: the model in the engine's process at tp_size 1, on Ray worker actors "
        "above; `ray`: on worker actors at any tp_size"
    )
    enable_lora: bool = Field(False, description="serve LoRA adapters (`lora_modules`) beside the base model")
    max_loras: int = Field(1, ge=1, description="LoRA adapters resident on the device at once (slots)")
    max_lora_rank: int = Field(16, ge=1, description="the largest LoRA rank; smaller ranks are zero-padded to it")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="LoRA adapters kept in host memory behind the device's slots (by each "
        "rank with worker actors); default: 4 * max_loras"
    )
    lora_modules: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapter name -> PEFT folder (adapter_config.json and "
        "adapter_model.safetensors)"
    )

    @model_validator(mode="after")
    def _check_kv_scales(self) -> "EngineConfig":
        # The device is checked where the model runs (`check_device`): a config is also built
        # where there is no GPU, by Serve on a cluster's head node say.
        if self.calculate_kv_scales and self.kv_cache_dtype == "auto":
            raise ValueError("calculate_kv_scales needs kv_cache_dtype: 'fp8_e4m3'")
        if self.kv_offload_gib and (self.uses_workers or not self.enable_prefix_caching):
            raise ValueError("kv_offload_gib needs enable_prefix_caching and the model in the engine's process "
                             "(tp_size 1, distributed_executor_backend 'auto')")
        if self.async_scheduling == "on" and self.uses_workers:
            raise ValueError("async_scheduling 'on' needs the model in the engine's process (tp_size 1, "
                             "distributed_executor_backend 'auto')")
        self._check_lora()
        return self

    def _check_lora(self) -> None:
        if not self.enable_lora:
            if self.lora_modules:
                raise ValueError("lora_modules needs enable_lora: true")
            return
        if self.speculative is not None and self.speculative.method == "draft":
            raise ValueError("enable_lora does not work with speculative method 'draft': the draft model has no adapters")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras {self.max_cpu_loras} is below max_loras {self.max_loras}")

    @property
    def host_lora_capacity(self) -> int:
        """Adapters kept in host memory: `max_cpu_loras`, by default four per device slot."""
        return self.max_cpu_loras or 4 * self.max_loras

    def check_device(self) -> None:
        """Raise ValueError if this process cannot run the model on the device asked for."""
        import torch

        if self.torch_device().type != "cuda":
            return
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
        check_fp8_kv_cache(self.kv_cache_dtype, torch.cuda.get_device_capability())

    @property
    def uses_workers(self) -> bool:
        """Whether the model runs on Ray worker actors rather than in the engine's process."""
        return self.tp_size > 1 or self.distributed_executor_backend == "ray"

    @property
    def overlaps_steps(self) -> bool:
        """Whether the engine schedules a step while the one before it is still running."""
        if self.async_scheduling == "auto":
            return self.torch_device().type == "cuda" and not self.uses_workers
        return self.async_scheduling == "on"

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or self.model

    def effective_max_model_len(self, model: "ModelConfig") -> int:
        """`max_model_len`, or the model's own limit when unset; never beyond that limit."""
        limit = model.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings {limit}")
        return self.max_model_len or limit

    def torch_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: "torch.dtype | None") -> "torch.dtype":
        """`auto` is the checkpoint's dtype on a GPU and float32 on a CPU."""
        import torch

        from kvserve.workers.models.config import DTYPES

        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.torch_device().type == "cpu" or checkpoint_dtype is None:
            return torch.float32
        return checkpoint_dtype

    def kv_cache_torch_dtype(self, model_dtype: "torch.dtype") -> "torch.dtype":
        import torch

        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8_e4m3" else model_dtype


def check_fp8_kv_cache(kv_cache_dtype: str, capability: tuple[int, int]) -> None:
    """The Triton kernels convert to and from e4m3 with instructions of compute capability 8.9
    (Ada, Hopper) and newer."""
    if kv_cache_dtype == "fp8_e4m3" and capability < (8, 9):
        raise ValueError(
            f"kv_cache_dtype: 'fp8_e4m3' needs a GPU of compute capability 8.9 or newer; this one is "
            f"{capability[0]}.{capability[1]}: use kv_cache_dtype: 'auto'"
        )
