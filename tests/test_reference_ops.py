"""The PyTorch reference ops against naive computations and Hugging Face's own layers."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvserve.kernels import reference as ops
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.rope import build_cos_sin_cache

NUM_KV_HEADS, HEAD_DIM, NUM_BLOCKS = 2, 8, 64
DECODES = [(1, 1), (4, 1), (7, 1), (16, 1), (33, 1)]  # (context_len, query_len)
PREFILLS = [(5, 5), (16, 16), (20, 3), (32, 16), (9, 2), (12, 1)]  # with and without a cached prefix


def test_store_kv_writes_only_its_slots():
    k_cache = torch.full((NUM_BLOCKS, 4, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    v_cache = k_cache.clone()
    slots = torch.randperm(NUM_BLOCKS * 4)[:10]
    key, value = torch.randn(2, 10, NUM_KV_HEADS, HEAD_DIM)
    ops.store_kv(key, value, k_cache, v_cache, slots)
    for cache, written in ((k_cache, key), (v_cache, value)):
        flat = cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
        assert torch.equal(flat[slots], written)
        untouched = torch.ones(len(flat), dtype=torch.bool)
        untouched[slots] = False
        assert flat[untouched].isnan().all()


def naive_attention(q, k, v, scale):
    """q [Q, Hq, D] as the last Q of the len(k) positions; float64, heads repeated."""
    q_len, ctx = len(q), len(k)
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * scale
    visible = torch.ones(q_len, ctx, dtype=torch.bool).tril(ctx - q_len)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (weights @ v).transpose(0, 1)


@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(
    "seqs, dtype",
    [
        pytest.param(DECODES + PREFILLS, torch.float32, id="mixed"),
        pytest.param(DECODES, torch.float32, id="decodes"),
        pytest.param(PREFILLS, torch.float32, id="prefills"),
        pytest.param(DECODES + PREFILLS, torch.bfloat16, id="mixed-bf16"),
        pytest.param([(9, 1), (10, 1)] + PREFILLS, torch.float32, id="mixed-one-decode-group"),
    ],
)
def test_paged_attention_matches_dense(paged, seqs, dtype, block_size, group):
    torch.manual_seed(0)
    context_lens, query_lens = zip(*seqs)
    tables = paged.block_tables(context_lens, block_size, NUM_BLOCKS)
    meta = paged.metadata(tables, context_lens, query_lens, block_size)
    # Stale but finite values everywhere else: masking, not zeros, must hide them.
    k_cache = torch.randn(NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=dtype) * 100
    v_cache = torch.randn_like(k_cache) * 100
    q = torch.randn(sum(query_lens), NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype)
    dense = []
    for table, ctx in zip(tables, context_lens):
        k, v = torch.randn(2, ctx, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = k
        v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = v
        dense.append((k, v))

    scale = HEAD_DIM**-0.5
    out = ops.paged_attention(q, k_cache, v_cache, meta, scale)

    assert out.shape == q.shape and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    starts = meta.query_start_loc_cpu
    for i, (k, v) in enumerate(dense):
        expected = naive_attention(q[starts[i] : starts[i + 1]], k, v, scale)
        got = out[starts[i] : starts[i + 1]].double()
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def test_fp8_cache_stores_scaled_and_attends_dequantized(paged):
    """K/V stored as e4m3 of key / k_scale (saturated), attended as the cache times the scale."""
    torch.manual_seed(0)
    context_lens, query_lens = zip(*(DECODES + PREFILLS))
    block_size, k_scale, v_scale = 4, 0.02, 0.05
    tables = paged.block_tables(context_lens, block_size, NUM_BLOCKS)
    meta = paged.metadata(tables, context_lens, query_lens, block_size)
    k_cache = torch.zeros(NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=ops.FP8)
    v_cache = torch.zeros_like(k_cache)
    q = torch.randn(sum(query_lens), NUM_KV_HEADS * 2, HEAD_DIM)
    dense = []
    for table, ctx in zip(tables, context_lens):
        k, v = torch.randn(2, ctx, NUM_KV_HEADS, HEAD_DIM)
        k[0, 0, 0] = 1e3  # beyond 448 * k_scale: saturates
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        ops.store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
        dense.append((k, v))

    scale = HEAD_DIM**-0.5
    out = ops.paged_attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale)

    starts = meta.query_start_loc_cpu
    for i, (k, v) in enumerate(dense):
        k_fp8, v_fp8 = ((t / s).clamp(-ops.FP8_MAX, ops.FP8_MAX).to(ops.FP8) for t, s in ((k, k_scale), (v, v_scale)))
        assert k_fp8[0, 0, 0].float() == ops.FP8_MAX
        expected = naive_attention(q[starts[i] : starts[i + 1]], k_fp8.double() * k_scale, v_fp8.double() * v_scale, scale)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf(dtype):
    hf = LlamaRMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(hf.weight, 1.0, 0.2)
    hf.to(dtype)
    x, residual = torch.randn(2, 7, 64, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(ops.rms_norm(x, hf.weight, 1e-5), hf(x))
        normed, new_residual = ops.rms_norm(x, hf.weight, 1e-5, residual)
        assert torch.equal(new_residual, x + residual)
        assert torch.equal(normed, hf(x + residual))


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_matches_hf(rope_scaling, dtype):
    hf_config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_theta=5e5, rope_scaling=rope_scaling, architectures=["LlamaForCausalLM"],
    )
    config = ModelConfig.from_dict(hf_config.to_dict())
    positions = torch.tensor([0, 1, 2, 63, 64, 200, 511, 5])
    q = torch.randn(len(positions), 4, 16, dtype=dtype)
    k = torch.randn(len(positions), 2, 16, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(hf_config)(q, positions[None])
    expected_q, expected_k = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)

    got_q, got_k = ops.rotary_embedding(positions, q.clone(), k.clone(), build_cos_sin_cache(config))

    assert torch.equal(got_q, expected_q[0]) and torch.equal(got_k, expected_k[0])


def test_silu_and_mul():
    x = torch.randn(5, 2 * 24)
    assert torch.equal(ops.silu_and_mul(x), F.silu(x[:, :24]) * x[:, 24:])
