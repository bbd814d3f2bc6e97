"""Plain-PyTorch ops: the CPU path and the ground truth for the Triton kernels.

`store_kv` and `paged_attention` take per-tensor scales for an FP8 (e4m3) KV cache, as the
Triton kernels do: the cache holds key / k_scale and value / v_scale.
"""

import torch
import torch.nn.functional as F

from kvserve.kernels.metadata import AttentionMetadata

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


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
    key / k_scale and value / v_scale; an FP8 cache saturates them to its range."""
    _, _, num_heads, head_dim = k_cache.shape
    k_cache.view(-1, num_heads, head_dim)[slot_mapping] = _quantize(key, k_scale, k_cache.dtype)
    v_cache.view(-1, num_heads, head_dim)[slot_mapping] = _quantize(value, v_scale, v_cache.dtype)


def _quantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    if dtype == FP8:
        return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)  # torch's cast overflows to NaN
    return x if scale == 1.0 else x / scale


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
    out = _attention(q, k_cache, v_cache, meta, scale * k_scale)
    return out if v_scale == 1.0 else out.mul_(v_scale)


def _attention(q, k_cache, v_cache, meta, scale):
    out = q.new_empty(q.shape)
    num_decodes = meta.num_decodes
    if num_decodes:
        out[:num_decodes] = _decode_attention(q[:num_decodes], k_cache, v_cache, meta, scale)
    starts, context_lens = meta.query_start_loc_cpu, meta.context_lens_cpu
    for i in range(num_decodes, meta.num_seqs):
        start, end = starts[i], starts[i + 1]
        out[start:end] = _prefill_attention(
            q[start:end], k_cache, v_cache, meta.block_tables[i], context_lens[i], scale
        )
    return out


def _decode_attention(q, k_cache, v_cache, meta, scale):
    """All single-query sequences, in a few padded batches of similar context lengths (one
    batch padded to the longest context would gather and attend to mostly padding)."""
    num_decodes = q.shape[0]
    lens = meta.context_lens_cpu[:num_decodes]
    groups = _length_groups(lens)
    if len(groups) == 1:  # no rows to pick: nothing copied to the device (a CUDA graph allows none)
        tables, context_lens = meta.block_tables[:num_decodes], meta.context_lens[:num_decodes]
        return _decode_batch(q, k_cache, v_cache, tables, context_lens, max(lens), scale)
    out = torch.empty_like(q)
    for group in groups:
        rows = torch.tensor(group, device=q.device)
        out[rows] = _decode_batch(q[rows], k_cache, v_cache, meta.block_tables[rows], meta.context_lens[rows],
                                  max(lens[i] for i in group), scale)
    return out


def _length_groups(lens: list[int], max_padding: float = 1.25) -> list[list[int]]:
    """Row indices grouped longest first, each group padded by at most `max_padding`."""
    order = sorted(range(len(lens)), key=lens.__getitem__, reverse=True)
    groups: list[list[int]] = []
    longest = total = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * longest <= max_padding * (total + lens[i]):
            groups[-1].append(i)
            total += lens[i]
            continue
        groups.append([i])
        longest = total = lens[i]
    return groups


def _decode_batch(q, k_cache, v_cache, tables, context_lens, max_ctx, scale):
    block_size = k_cache.shape[1]
    tables = tables[:, : -(-max_ctx // block_size)]
    keys = _gather(k_cache, tables, q.dtype)  # [B, Hk, L, D]
    values = _gather(v_cache, tables, q.dtype)
    positions = torch.arange(keys.shape[2], device=q.device)
    mask = positions < context_lens[:, None]  # [B, L]
    # A slot past a row's context may hold anything a block's earlier owner left, NaN included,
    # which masking does not remove (its score, or its zero weight times its value, stays NaN).
    # `_gather` copied the keys and values: such slots are zeroed in place.
    stale = ~mask[:, None, :, None]
    keys.masked_fill_(stale, 0.0)
    values.masked_fill_(stale, 0.0)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def _prefill_attention(q, k_cache, v_cache, block_table, context_len, scale):
    """One sequence's queries [Q, Hq, D], the last Q of its `context_len` tokens."""
    block_size = k_cache.shape[1]
    table = block_table[: -(-context_len // block_size)]
    keys = _gather(k_cache, table[None], q.dtype)[..., :context_len, :]
    values = _gather(v_cache, table[None], q.dtype)[..., :context_len, :]
    q_len = q.shape[0]
    if q_len == context_len:
        mask, causal = None, True
    else:
        # Query i sits at absolute position context_len - q_len + i and sees keys up to there.
        mask = torch.ones(q_len, context_len, dtype=torch.bool, device=q.device).tril(context_len - q_len)
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys, values,
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _gather(cache: torch.Tensor, tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Blocks `tables` [B, N] of a cache [blocks, block_size, H, D] as [B, H, N*block_size, D]
    in `dtype` (an FP8 cache is widened to the queries' dtype)."""
    batch, num_blocks = tables.shape
    _, block_size, num_heads, head_dim = cache.shape
    blocks = cache[tables.flatten()].to(dtype)
    return blocks.view(batch, num_blocks * block_size, num_heads, head_dim).transpose(1, 2)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as Hugging Face's LlamaRMSNorm; with `residual`, adds it first and returns
    `(normed, x + residual)`."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE (rotate halves) of q [T, Hq, D] and k [T, Hk, D], in place."""
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return x.copy_(rotated)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2*I] -> silu(x[:, :I]) * x[:, I:]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
