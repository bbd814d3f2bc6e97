"""One decoder-only transformer for Llama, Mistral, Qwen2 and Qwen3 checkpoints."""

from types import ModuleType

import torch
from torch import nn

from kvserve.kernels.metadata import AttentionMetadata
from kvserve.workers.models.distributed import SINGLE, TPGroup
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.quant_methods import LinearMethods
from kvserve.workers.models.rope import build_cos_sin_cache
from kvserve.workers.models.parallel_layers import (
    MergedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_heads_of_rank,
)

KVCache = tuple[torch.Tensor, torch.Tensor]
FP8_HEADROOM = 8.0


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: ModuleType):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """This rank's query heads and the KV heads they read (all of them with one rank)."""

    def __init__(self, config: ModelConfig, ops: ModuleType, tp: TPGroup, methods: LinearMethods, prefix: str):
        super().__init__()
        self.num_heads = config.num_heads // tp.size
        first_kv_head, self.num_kv_heads = kv_heads_of_rank(config, tp)
        self.head_dim = head_dim = config.head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.ops = ops
        starts = None
        if tp.size > 1:
            starts = [tp.rank * self.q_size, first_kv_head * head_dim, first_kv_head * head_dim]
        qkv_method = methods.for_layer([f"{prefix}.{name}" for name in ("q_proj", "k_proj", "v_proj")])
        self.qkv_proj = MergedLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], config.attention_bias, starts, qkv_method
        )
        o_method = methods.for_layer([f"{prefix}.o_proj"])
        self.o_proj = RowParallelLinear(config.num_heads * head_dim, config.hidden_size, tp, o_method)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops)
        self.qk_norm = config.qk_norm
        # The KV cache holds k / k_scale and v / v_scale: 1.0 but for a calibrated FP8 cache.
        self.k_scale = self.v_scale = 1.0
        self.calibrate_kv_scales = False

    def forward(self, x, positions, kv_cache: KVCache, meta: AttentionMetadata, cos_sin_cache):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rotary_embedding(positions, q, k, cos_sin_cache)
        if self.calibrate_kv_scales:
            self.k_scale, self.v_scale = fp8_scale(k), fp8_scale(v)
        k_cache, v_cache = kv_cache
        self.ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        out = self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(out.view(-1, self.q_size))


def fp8_scale(x: torch.Tensor) -> float:
    """A scale that puts x's largest magnitude at 1/FP8_HEADROOM of e4m3's range: room for inputs
    larger than the calibration's, which costs no precision (e4m3's relative step is the same
    over most of its range)."""
    return max(x.abs().max().item(), 1e-6) * FP8_HEADROOM / torch.finfo(torch.float8_e4m3fn).max


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: ModuleType, tp: TPGroup, methods: LinearMethods, prefix: str):
        super().__init__()
        size = config.intermediate_size // tp.size
        starts = [tp.rank * size] * 2 if tp.size > 1 else None
        gate_up_method = methods.for_layer([f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], False, starts, gate_up_method)
        down_method = methods.for_layer([f"{prefix}.down_proj"])
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, tp, down_method)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ops: ModuleType, tp: TPGroup, methods: LinearMethods, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, ops, tp, methods, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = MLP(config, ops, tp, methods, f"{prefix}.mlp")

    def forward(self, x, residual, positions, kv_cache, meta, cos_sin_cache):
        """Returns (mlp output, residual): the caller adds them, fused into the next norm."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, kv_cache, meta, cos_sin_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderForCausalLM(nn.Module):
    """The whole model, or with `tp` of several ranks this rank's shard of every layer; its
    linear layers hold their weights as `methods` (named by the checkpoint's layers) say."""

    def __init__(self, config: ModelConfig, ops: ModuleType, tp: TPGroup = SINGLE, methods: LinearMethods | None = None):
        super().__init__()
        methods = methods or LinearMethods(None, ops)
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, ops, tp, methods, f"model.layers.{i}") for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        if not config.tie_word_embeddings:
            self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(config), persistent=False)

    def materialize(self, device: torch.device) -> "DecoderForCausalLM":
        """Gives a model built on the meta device uninitialized storage on `device`, and
        recomputes the rotary table, which is not a weight."""
        self.to_empty(device=device)
        self.cos_sin_cache = build_cos_sin_cache(self.config, device)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, kv_cache, meta, self.cos_sin_cache)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head.logits(hidden)
