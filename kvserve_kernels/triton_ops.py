"""Triton kernels with the signatures and semantics of `reference`, for the GPU path.

`store_kv` and `paged_attention` also take optional per-tensor scales, for an FP8 (e4m3) KV
cache. Every kernel also runs under Triton's interpreter (`TRITON_INTERPRET=1`) on CPU tensors,
which is how the tests check them against the references on a machine without a GPU.
"""

import math

import torch
import triton
import triton.language as tl

from kvserve.kernels.metadata import AttentionMetadata

# Tokens of one decode program's share of a context (flash decoding); a multiple of the KV tile.
PARTITION_SIZE = 256

# The interpreter multiplies bfloat16 blocks as raw 16-bit integers, so there dots run in float32.
# Read, like @triton.jit reads it, when this module's kernels are defined.
_INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)
_FP8_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write row t of key/value [T, H, D] into slot `slot_mapping[t]` of the paged caches, as
    key / k_scale and value / v_scale; an FP8 (e4m3) cache clamps them to its range."""
    num_tokens, num_heads, head_dim = key.shape
    assert key.stride(2) == value.stride(2) == 1
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *_cache_strides(k_cache),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale, v_scale,
    key_stride_t, key_stride_h, value_stride_t, value_stride_h,
    cache_stride_block, cache_stride_slot, cache_stride_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    cache_offsets = (
        (slot // BLOCK_SIZE) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_slot
        + heads * cache_stride_head + dims
    )
    key = tl.load(key_ptr + token * key_stride_t + heads * key_stride_h + dims, mask=mask)
    tl.store(k_cache_ptr + cache_offsets, _quantize(key, k_scale, k_cache_ptr), mask=mask)
    value = tl.load(value_ptr + token * value_stride_t + heads * value_stride_h + dims, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, _quantize(value, v_scale, v_cache_ptr), mask=mask)


@triton.jit
def _quantize(x, scale, cache_ptr):
    x = x.to(tl.float32) / scale
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.clamp(x, -_FP8_MAX, _FP8_MAX)
        if _INTERPRETED:
            x = _round_to_e4m3(x)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _round_to_e4m3(x):
    """x on the e4m3 grid (ties to even), still in float32. The interpreter's own cast truncates
    subnormals and drops a rounding carry into the exponent (1.97 -> 1.0); exact values it
    casts right. `(x + magic) - magic` rounds x to a multiple of magic's float32 ulp, `step`."""
    step = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.abs(x), 2.0**-6))) - 3.0)  # 3 mantissa bits
    magic = step * 1.5 * 2.0**23
    return (x + magic) - magic


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries [T, Hq, D] over its cached context,
    whose keys and values are the caches' times k_scale and v_scale (see `store_kv`)."""
    head_dim = q.shape[2]
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert q.stride(2) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qk_scale = scale * k_scale * math.log2(math.e)  # softmax in base 2
    if meta.num_decodes:
        _decode_attention(q, k_cache, v_cache, meta, qk_scale, v_scale, out)
    if meta.num_decodes < meta.num_seqs:
        _prefill_attention(q, k_cache, v_cache, meta, qk_scale, v_scale, out)
    return out


def _decode_attention(q, k_cache, v_cache, meta, qk_scale, v_scale, out):
    """Flash decoding: each (sequence, KV head, partition) program attends its query heads to
    one partition of the context; a second kernel merges the partitions."""
    num_seqs, (_, num_heads, head_dim) = meta.num_decodes, q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_partitions = triton.cdiv(max(meta.context_lens_cpu[:num_seqs]), PARTITION_SIZE)
    partial_max, partial_sum = torch.empty(2, num_seqs, num_heads, num_partitions, device=q.device)
    partial_out = torch.empty(num_seqs, num_heads, num_partitions, head_dim, device=q.device)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, meta.block_tables, meta.context_lens,
        partial_max, partial_sum, partial_out, qk_scale,
        q.stride(0), q.stride(1), meta.block_tables.stride(0), *_cache_strides(k_cache),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=_tile(head_dim), PARTITION_SIZE=PARTITION_SIZE,
    )
    _decode_reduce_kernel[(num_seqs, num_heads)](
        partial_max, partial_sum, partial_out, out, meta.context_lens, v_scale,
        out.stride(0), out.stride(1), num_partitions,
        HEAD_DIM=head_dim, PARTITION_SIZE=PARTITION_SIZE,
        MAX_PARTITIONS=triton.next_power_of_2(num_partitions),
    )


@triton.jit
def _decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    partial_max_ptr, partial_sum_ptr, partial_out_ptr, qk_scale,
    q_stride_t, q_stride_h, block_tables_stride,
    cache_stride_block, cache_stride_slot, cache_stride_head,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
):
    seq, kv_head, partition = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = partition * PARTITION_SIZE
    if start >= context_len:
        return
    end = tl.minimum(start + PARTITION_SIZE, context_len)

    rows = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * q_stride_t + heads[:, None] * q_stride_h + dims[None, :],
                mask=rows[:, None] < GROUP, other=0.0)
    row_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    block_table_ptr = block_tables_ptr + seq * block_tables_stride
    for tile_start in range(start, end, BLOCK_N):
        kv_pos = tile_start + tl.arange(0, BLOCK_N)
        kv_valid = kv_pos < end
        row_max, row_sum, acc = _attend_tile(
            q, row_max, row_sum, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
            kv_pos, kv_valid, kv_valid[None, :], qk_scale,
            cache_stride_block, cache_stride_slot, cache_stride_head, BLOCK_SIZE, HEAD_DIM,
        )

    # Partials are laid out [seq, head, partition] (+ [dim] for the output).
    num_partitions = tl.num_programs(2)
    partial = (seq * GROUP * tl.num_programs(1) + heads) * num_partitions + partition
    head_mask = rows < GROUP
    tl.store(partial_max_ptr + partial, row_max, mask=head_mask)
    tl.store(partial_sum_ptr + partial, row_sum, mask=head_mask)
    tl.store(partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    partial_max_ptr, partial_sum_ptr, partial_out_ptr, out_ptr, context_lens_ptr, v_scale,
    out_stride_t, out_stride_h, num_partitions,
    HEAD_DIM: tl.constexpr, PARTITION_SIZE: tl.constexpr, MAX_PARTITIONS: tl.constexpr,
):
    seq, head = tl.program_id(0), tl.program_id(1)
    used = tl.cdiv(tl.load(context_lens_ptr + seq), PARTITION_SIZE)
    first = (seq * tl.num_programs(1) + head) * num_partitions
    partitions = tl.arange(0, MAX_PARTITIONS)
    maxes = tl.load(partial_max_ptr + first + partitions, mask=partitions < used, other=float("-inf"))
    global_max = tl.max(maxes, 0)
    sums = tl.load(partial_sum_ptr + first + partitions, mask=partitions < used, other=0.0)
    total = tl.sum(sums * tl.exp2(maxes - global_max), 0)

    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for p in range(0, used):
        weight = tl.exp2(tl.load(partial_max_ptr + first + p) - global_max)
        acc += weight * tl.load(partial_out_ptr + (first + p) * HEAD_DIM + dims)
    tl.store(out_ptr + seq * out_stride_t + head * out_stride_h + dims, acc * (v_scale / total))


def _prefill_attention(q, k_cache, v_cache, meta, qk_scale, v_scale, out):
    """One launch over all multi-token sequences: a program per (query tile, sequence, head)."""
    num_heads, head_dim = q.shape[1:]
    num_seqs = meta.num_seqs - meta.num_decodes
    tile = _tile(head_dim)
    grid = (triton.cdiv(meta.max_query_len, tile), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, meta.block_tables, meta.context_lens, meta.query_start_loc,
        qk_scale, v_scale, meta.num_decodes,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        *_cache_strides(k_cache),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=tile, BLOCK_N=tile,
    )


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    qk_scale, v_scale, first_seq,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h, block_tables_stride,
    cache_stride_block, cache_stride_slot, cache_stride_head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile, seq, head = tl.program_id(0), first_seq + tl.program_id(1), tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if tile * BLOCK_M >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < query_len
    q_pos = context_len - query_len + rows  # absolute positions of the queries
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (query_start + rows)[:, None] * q_stride_t + head * q_stride_h + dims[None, :],
                mask=row_valid[:, None], other=0.0)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    block_table_ptr = block_tables_ptr + seq * block_tables_stride
    # Keys up to the tile's last query; every row sees key 0, so no row stays all -inf.
    kv_end = tl.minimum(context_len, context_len - query_len + (tile + 1) * BLOCK_M)
    for tile_start in range(0, kv_end, BLOCK_N):
        kv_pos = tile_start + tl.arange(0, BLOCK_N)
        kv_valid = kv_pos < context_len
        visible = (kv_pos[None, :] <= q_pos[:, None]) & kv_valid[None, :]
        row_max, row_sum, acc = _attend_tile(
            q, row_max, row_sum, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, head // GROUP,
            kv_pos, kv_valid, visible, qk_scale,
            cache_stride_block, cache_stride_slot, cache_stride_head, BLOCK_SIZE, HEAD_DIM,
        )
    out = acc * (v_scale / row_sum)[:, None]
    tl.store(out_ptr + (query_start + rows)[:, None] * out_stride_t + head * out_stride_h + dims[None, :],
             out, mask=row_valid[:, None])


@triton.jit
def _attend_tile(
    q, row_max, row_sum, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
    kv_pos, kv_valid, visible, qk_scale,
    cache_stride_block, cache_stride_slot, cache_stride_head,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Fold the keys at positions `kv_pos` (read through the block table) into the online
    softmax of `q` [M, D]: running max and sum [M] in base 2 and unnormalized output [M, D].
    An FP8 cache is widened to q's dtype; its scales are applied to scores and output."""
    block_ids = tl.load(block_table_ptr + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
    slots = block_ids * cache_stride_block + (kv_pos % BLOCK_SIZE) * cache_stride_slot
    offsets = (slots + kv_head * cache_stride_head)[:, None] + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=kv_valid[:, None], other=0.0).to(q.dtype)
    scores = tl.where(visible, exact_dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    probs = tl.exp2(scores - new_max[:, None])
    rescale = tl.exp2(row_max - new_max)
    v = tl.load(v_cache_ptr + offsets, mask=kv_valid[:, None], other=0.0).to(q.dtype)
    acc = acc * rescale[:, None] + exact_dot(probs.to(q.dtype), v)
    return new_max, row_sum * rescale + tl.sum(probs, 1), acc


@triton.jit
def exact_dot(a, b):
    """tl.dot without TF32 shortcuts; in float32 under the interpreter."""
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision="ieee")


def _cache_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a [num_blocks, block_size, H, D] cache over blocks, slots and heads."""
    assert cache.stride(3) == 1
    return cache.stride(0), cache.stride(1), cache.stride(2)


def _tile(head_dim: int) -> int:
    """Query and KV tile length: shorter for large heads, to keep tiles in shared memory."""
    return 64 if head_dim <= 128 else 32


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as Hugging Face's LlamaRMSNorm over the last dim of x (2D, or 3D such as per-head
    q/k); with `residual`, adds it first and returns `(normed, x + residual)`."""
    rows = _as_3d(x)
    size = x.shape[-1]
    normed = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    residual_rows = _as_3d(residual) if residual is not None else rows
    _rms_norm_kernel[rows.shape[:2]](
        rows, residual_rows, weight, normed, summed,
        *rows.stride()[:2], *residual_rows.stride()[:2], size, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(size),
    )
    return normed if residual is None else (normed, summed)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, normed_ptr, summed_ptr,
    x_stride0, x_stride1, residual_stride0, residual_stride1, size, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    i, j = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < size
    out_offsets = (i * tl.num_programs(1) + j) * size + cols
    x = tl.load(x_ptr + i * x_stride0 + j * x_stride1 + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual_row = residual_ptr + i * residual_stride0 + j * residual_stride1
        residual = tl.load(residual_row + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)  # rounded like the reference
        tl.store(summed_ptr + out_offsets, x, mask=mask)
    x32 = x.to(tl.float32)
    normed = (x32 * tl.rsqrt(tl.sum(x32 * x32, 0) / size + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask).to(tl.float32)
    tl.store(normed_ptr + out_offsets, weight * normed.to(tl.float32), mask=mask)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """x [..., N] as [A, B, N], a view for 2D x and for strided per-head slices of qkv [T, H, D];
    tokens go first, on the grid axis that has no 65535 limit."""
    rows = x if x.dim() == 3 else x.reshape(-1, 1, x.shape[-1])
    assert rows.stride(2) == 1
    return rows


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE (rotate halves) of q [T, Hq, D] and k [T, Hk, D], in place."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(2) == k.stride(2) == cos_sin_cache.stride(1) == 1
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
        BLOCK_Q=triton.next_power_of_2(num_q_heads), BLOCK_K=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
    )
    return q, k


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, cos_sin_stride,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0)
    cols = tl.arange(0, BLOCK_HALF)
    row = cos_sin_ptr + tl.load(positions_ptr + token) * cos_sin_stride
    # The reference rounds the table to the activations' dtype first.
    cos = tl.load(row + cols, mask=cols < HALF).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(row + HALF + cols, mask=cols < HALF).to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate_heads(q_ptr + token * q_stride_t, q_stride_h, cos, sin, NUM_Q_HEADS, HALF, BLOCK_Q, BLOCK_HALF)
    _rotate_heads(k_ptr + token * k_stride_t, k_stride_h, cos, sin, NUM_KV_HEADS, HALF, BLOCK_K, BLOCK_HALF)


@triton.jit
def _rotate_heads(
    ptr, stride_h, cos, sin,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (cols < HALF)
    first = ptr + heads * stride_h + cols
    x1 = tl.load(first, mask=mask).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
    tl.store(first, x1 * cos[None, :] - x2 * sin[None, :], mask=mask)
    tl.store(first + HALF, x2 * cos[None, :] + x1 * sin[None, :], mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2*I] -> silu(x[:, :I]) * x[:, I:]."""
    rows = x.reshape(-1, x.shape[-1])
    assert rows.stride(1) == 1
    size = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], size, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(size))
    grid = (rows.shape[0], triton.cdiv(size, block))
    _silu_and_mul_kernel[grid](rows, out, rows.stride(0), size, BLOCK=block)
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + size + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * size + cols, gate * tl.sigmoid(gate) * up, mask=mask)
