"""The Triton kernels against the reference ops: under Triton's interpreter on CPU tensors with
small shapes, and compiled on a GPU at real sizes.

Triton picks compiled or interpreted code when each @triton.jit function is defined, its own
library's included, and conftest has imported triton already (through transformers). So unless
the whole run has TRITON_INTERPRET=1, the CPU tests run in a child pytest process started with
it (`test_cpu_kernels_under_interpreter`), and are skipped here.
"""

import dataclasses

import pytest
import torch

from triton_cases import INTERPRETED, TOLERANCE, cpu, gpu, run_cpu_cases_under_interpreter

from kvserve.kernels import reference, triton_ops

NAN = float("nan")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_cpu_kernels_under_interpreter():
    run_cpu_cases_under_interpreter(__file__)


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Fresh float tensors from torch.empty are NaN, so output a kernel never writes fails."""
    empty = torch.empty

    def nan_filled(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(NAN) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_filled)


def assert_matches(got, expected, tolerance=None):
    assert not got.isnan().any(), "unwritten or NaN output"
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tolerance = tolerance or TOLERANCE[got.dtype]
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


# (context_len, query_len) of each sequence, decodes first. Decode contexts cover a single token,
# mid-block and block-boundary ends, and 1, 2 and 3 partitions; prefills come with and without a
# cached prefix, over one and two query tiles.
P = triton_ops.PARTITION_SIZE
DECODES = [(1, 1), (8, 1), (37, 1), (P, 1), (P + 1, 1), (2 * P + 88, 1)]
PREFILLS = [(16, 16), (45, 45), (40, 7), (130, 66), (64, 16), (100, 80), (200, 30), (12, 1)]
# At real sizes: long contexts, many partitions, prompts over many query tiles.
GPU_DECODES = [(n, 1) for n in (1, 15, 16, 17, 500, 1024, 3000, 8192)] * 4
GPU_PREFILLS = [(2048, 2048), (3000, 1000), (517, 517), (4096, 1), (777, 200)]


def random_seqs(seed: int) -> list[tuple[int, int]]:
    """A random ragged batch: a few decodes, then prefills with or without a cached prefix."""
    gen = torch.Generator().manual_seed(seed)
    decodes = [(int(n), 1) for n in torch.randint(1, 3 * P, (4,), generator=gen)]
    prefill_lens = torch.randint(1, 100, (3,), generator=gen).tolist()
    prefixes = torch.randint(0, 2, (3,), generator=gen) * torch.randint(1, 80, (3,), generator=gen)
    return decodes + [(q + int(p), q) for q, p in zip(prefill_lens, prefixes)]


ATTENTION_ARGS = "seqs, num_kv_heads, group, head_dim, block_size, dtype, device"


@pytest.mark.parametrize(
    ATTENTION_ARGS,
    [
        cpu(DECODES + PREFILLS, 2, 1, 16, 8, torch.float32, id="mixed-gqa1-d16-bs8"),
        cpu(DECODES + PREFILLS, 2, 2, 32, 16, torch.float32, id="mixed-gqa2-d32-bs16"),
        cpu(DECODES + PREFILLS, 2, 4, 64, 8, torch.float32, id="mixed-gqa4-d64-bs8"),
        cpu(DECODES + PREFILLS, 1, 8, 32, 16, torch.float32, id="mixed-mqa8-d32-bs16"),
        cpu(DECODES, 2, 4, 128, 16, torch.float32, id="decodes-gqa4-d128-bs16"),
        cpu(PREFILLS, 2, 2, 16, 8, torch.float32, id="prefills-gqa2-d16-bs8"),
        cpu(random_seqs(1), 2, 2, 32, 8, torch.float32, id="random-gqa2-d32-bs8"),
        cpu(DECODES + PREFILLS, 2, 4, 32, 16, torch.bfloat16, id="mixed-gqa4-d32-bs16-bf16"),
        gpu(GPU_DECODES + GPU_PREFILLS, 8, 4, 128, 16, torch.bfloat16, id="llama-bf16"),
        gpu(GPU_DECODES + GPU_PREFILLS, 8, 4, 128, 16, torch.float32, id="llama-fp32"),
        gpu(GPU_DECODES + GPU_PREFILLS, 4, 8, 64, 32, torch.bfloat16, id="gqa8-d64-bs32"),
        gpu(GPU_DECODES + GPU_PREFILLS, 4, 2, 256, 16, torch.bfloat16, id="gqa2-d256"),
        gpu(GPU_DECODES + GPU_PREFILLS, 1, 16, 128, 8, torch.bfloat16, id="mqa-bs8"),
    ],
)
def test_paged_attention(paged, seqs, num_kv_heads, group, head_dim, block_size, dtype, device):
    q, k_cache, v_cache, meta = attention_batch(
        paged, seqs, num_kv_heads, group, head_dim, block_size, dtype, device
    )
    scale = head_dim**-0.5

    got = triton_ops.paged_attention(q, k_cache, v_cache, meta, scale)

    assert_matches(got, reference.paged_attention(q, k_cache, v_cache, meta, scale))


@pytest.mark.parametrize(
    ATTENTION_ARGS,
    [
        cpu(DECODES + PREFILLS, 2, 2, 32, 8, torch.float32, id="mixed-gqa2-d32-bs8"),
        gpu(GPU_DECODES + GPU_PREFILLS, 8, 4, 128, 16, torch.bfloat16, id="llama-bf16"),
    ],
)
def test_paged_attention_fp8_cache(paged, seqs, num_kv_heads, group, head_dim, block_size, dtype, device):
    """Against the reference over the dequantized caches."""
    q, k_cache, v_cache, meta = attention_batch(
        paged, seqs, num_kv_heads, group, head_dim, block_size, dtype, device
    )
    k_scale, v_scale, scale = 0.3, 0.7, head_dim**-0.5
    k_fp8, v_fp8 = to_fp8(k_cache / k_scale), to_fp8(v_cache / v_scale)

    got = triton_ops.paged_attention(q, k_fp8, v_fp8, meta, scale, k_scale, v_scale)

    dequantized = (k_fp8.to(dtype) * k_scale, v_fp8.to(dtype) * v_scale)
    assert_matches(got, reference.paged_attention(q, *dequantized, meta, scale))


@pytest.mark.parametrize(
    ATTENTION_ARGS,
    [
        cpu(DECODES, 2, 4, 32, 8, torch.float32, id="decodes-gqa4-d32-bs8"),
        gpu(GPU_DECODES, 8, 4, 128, 16, torch.bfloat16, id="llama-bf16"),
    ],
)
def test_decode_attention_launched_as_a_cuda_graph_does(paged, seqs, num_kv_heads, group, head_dim, block_size,
                                                        dtype, device):
    """A captured decode graph launches the kernels for the longest context it allows, with
    block tables wider than any sequence's and stale block ids past each one's context."""
    q, k_cache, v_cache, meta = attention_batch(
        paged, seqs, num_kv_heads, group, head_dim, block_size, dtype, device
    )
    scale, num_seqs, longest = head_dim**-0.5, len(seqs), 3 * max(n for n, _ in seqs)
    stale = torch.randint(0, k_cache.shape[0], (num_seqs, -(-longest // block_size)), dtype=torch.int32, device=device)
    stale[:, : meta.block_tables.shape[1]] = meta.block_tables
    as_graph = dataclasses.replace(meta, block_tables=stale, max_context_len=longest,
                                   context_lens_cpu=[longest] * num_seqs)

    expected = reference.paged_attention(q, k_cache, v_cache, meta, scale)
    assert_matches(triton_ops.paged_attention(q, k_cache, v_cache, as_graph, scale), expected)
    assert_matches(reference.paged_attention(q, k_cache, v_cache, as_graph, scale), expected)


def attention_batch(paged, seqs, num_kv_heads, group, head_dim, block_size, dtype, device):
    """Queries, caches over shuffled blocks and metadata for a ragged batch of (context_len, query_len)."""
    torch.manual_seed(0)
    context_lens, query_lens = zip(*seqs)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 7
    tables = paged.block_tables(context_lens, block_size, num_blocks)
    meta = to_device(paged.metadata(tables, context_lens, query_lens, block_size), device)
    # Stale but large values everywhere outside the contexts: masking must hide them.
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device) * 100
    v_cache = torch.randn_like(k_cache) * 100
    context_slots = all_slots(tables, context_lens, block_size, device)
    for cache in (k_cache, v_cache):
        cache.view(-1, num_kv_heads, head_dim)[context_slots] = torch.randn(
            len(context_slots), num_kv_heads, head_dim, dtype=dtype, device=device
        )
    # Queries as a strided slice of a fused projection, as the model hands them over.
    qkv = torch.randn(sum(query_lens), (num_kv_heads * group + 1) * head_dim, dtype=dtype, device=device)
    q = qkv[:, head_dim:].view(-1, num_kv_heads * group, head_dim)
    return q, k_cache, v_cache, meta


def all_slots(tables, context_lens, block_size, device) -> torch.Tensor:
    slots = [
        table[p // block_size] * block_size + p % block_size
        for table, context_len in zip(tables, context_lens)
        for p in range(context_len)
    ]
    return torch.tensor(slots, device=device)


def to_device(meta, device):
    for name in ("query_start_loc", "context_lens", "block_tables", "slot_mapping"):
        setattr(meta, name, getattr(meta, name).to(device))
    return meta


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """e4m3 with saturation (torch's cast turns values out of range into NaN)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "seqs, num_kv_heads, head_dim, block_size, dtype, device",
    [
        cpu(DECODES[:3] + PREFILLS, 2, 16, 8, torch.float32, id="d16-bs8"),
        cpu(DECODES[:3] + PREFILLS, 3, 64, 16, torch.bfloat16, id="3heads-d64-bs16-bf16"),
        gpu(GPU_DECODES + GPU_PREFILLS, 8, 128, 16, torch.bfloat16, id="llama-bf16"),
    ],
)
def test_store_kv_writes_only_its_slots(paged, seqs, num_kv_heads, head_dim, block_size, dtype, device):
    key, value, slots, num_blocks = store_batch(
        paged, seqs, num_kv_heads, head_dim, block_size, dtype, device
    )
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), NAN, dtype=dtype, device=device)
    v_cache = k_cache.clone()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()

    triton_ops.store_kv(key, value, k_cache, v_cache, slots)

    reference.store_kv(key, value, expected_k, expected_v, slots)
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "seqs, num_kv_heads, head_dim, block_size, dtype, device",
    [
        cpu(DECODES[:3] + PREFILLS, 2, 32, 16, torch.bfloat16, id="d32-bs16-bf16"),
        cpu(DECODES[:3] + PREFILLS, 2, 16, 8, torch.float32, id="d16-bs8"),
        gpu(GPU_DECODES + GPU_PREFILLS, 8, 128, 16, torch.bfloat16, id="llama-bf16"),
    ],
)
def test_store_kv_quantizes_to_fp8(paged, seqs, num_kv_heads, head_dim, block_size, dtype, device):
    key, value, slots, num_blocks = store_batch(
        paged, seqs, num_kv_heads, head_dim, block_size, dtype, device
    )
    k_scale, v_scale = 0.5, 0.25
    key[0, 0, :2] = torch.tensor([1e4, -1e4], device=device)  # out of range: saturates
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), NAN, device=device).to(torch.float8_e4m3fn)
    v_cache = k_cache.clone()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()

    triton_ops.store_kv(key, value, k_cache, v_cache, slots, k_scale, v_scale)

    reference.store_kv(key, value, expected_k, expected_v, slots, k_scale, v_scale)
    assert expected_k.view(-1, num_kv_heads, head_dim)[slots[0], 0, :2].float().abs().eq(FP8_MAX).all()
    torch.testing.assert_close(k_cache.float(), expected_k.float(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache.float(), expected_v.float(), rtol=0, atol=0, equal_nan=True)


def store_batch(paged, seqs, num_kv_heads, head_dim, block_size, dtype, device):
    """Keys and values [T, H, D], strided as slices of a fused projection, and their slots."""
    torch.manual_seed(0)
    context_lens, query_lens = zip(*seqs)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    tables = paged.block_tables(context_lens, block_size, num_blocks)
    slots = paged.metadata(tables, context_lens, query_lens, block_size).slot_mapping.to(device)
    kv = torch.randn(len(slots), 2, num_kv_heads, head_dim + 1, dtype=dtype, device=device)
    return kv[:, 0, :, 1:], kv[:, 1, :, 1:], slots, num_blocks


@pytest.mark.parametrize(
    "shape, weight_dtype, dtype, device",
    [
        cpu((7, 48), torch.float32, torch.float32, id="fp32"),
        cpu((5, 3, 80), torch.bfloat16, torch.bfloat16, id="per-head-bf16"),
        cpu((6, 64), torch.float32, torch.bfloat16, id="fp32-weight-bf16"),
        gpu((1000, 4096), torch.bfloat16, torch.bfloat16, id="llama-bf16"),
        gpu((300, 5120), torch.float32, torch.float32, id="fp32"),
    ],
)
def test_rms_norm(shape, weight_dtype, dtype, device):
    torch.manual_seed(0)
    # x strided, as a slice of a wider tensor (per-head q/k norm gets a slice of fused qkv).
    x = torch.randn(*shape[:-1], shape[-1] + 16, dtype=dtype, device=device)[..., 16:]
    residual = torch.randn(shape, dtype=dtype, device=device)
    weight = torch.randn(shape[-1], dtype=weight_dtype, device=device)

    # With a float32 weight, the output is float32 but holds x's rounding.
    tolerance = TOLERANCE[dtype]
    assert_matches(triton_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), tolerance)
    normed, summed = triton_ops.rms_norm(x, weight, 1e-6, residual)
    expected_normed, expected_summed = reference.rms_norm(x, weight, 1e-6, residual)
    assert_matches(normed, expected_normed, tolerance)
    assert_matches(summed, expected_summed)


@pytest.mark.parametrize(
    "num_tokens, num_heads, num_kv_heads, head_dim, dtype, device",
    [
        cpu(9, 4, 2, 16, torch.float32, id="d16"),
        cpu(5, 6, 1, 64, torch.float32, id="6heads-d64"),
        cpu(7, 8, 2, 32, torch.bfloat16, id="d32-bf16"),
        gpu(2000, 32, 8, 128, torch.bfloat16, id="llama-bf16"),
        gpu(500, 16, 4, 64, torch.float32, id="fp32"),
    ],
)
def test_rotary_embedding(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device):
    torch.manual_seed(0)
    max_positions = 4096
    inv_freq = 1e4 ** -(torch.arange(0, head_dim, 2, device=device) / head_dim)
    freqs = torch.arange(max_positions, device=device)[:, None] * inv_freq
    cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_positions, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)
    v_before = v.clone()
    expected_q, expected_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cos_sin_cache)

    got_q, got_k = triton_ops.rotary_embedding(positions, q, k, cos_sin_cache)

    assert got_q is q and got_k is k
    assert_matches(q, expected_q)
    assert_matches(k, expected_k)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize(
    "shape, dtype, device",
    [
        cpu((5, 2 * 40), torch.float32, id="fp32"),
        cpu((3, 2 * 1100), torch.float32, id="two-column-tiles"),
        cpu((2, 3, 2 * 24), torch.bfloat16, id="3d-bf16"),
        gpu((4000, 2 * 11008), torch.bfloat16, id="llama-bf16"),
        gpu((100, 2 * 4864), torch.float32, id="fp32"),
    ],
)
def test_silu_and_mul(shape, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device)
    assert_matches(triton_ops.silu_and_mul(x), reference.silu_and_mul(x))
