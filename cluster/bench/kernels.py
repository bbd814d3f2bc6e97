"""`kvserve bench kernels`: the attention kernels over the paged KV cache against the device's
copy bandwidth and against torch's `scaled_dot_product_attention` on the same K/V laid out
contiguously. Every timed case first checks that both give the same output, so a wrong kernel
cannot post a good number."""

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from kvserve.kernels import get_ops
from kvserve.kernels.metadata import AttentionMetadata
from kvserve.workers.models.config import DTYPES
from kvserve.workers.runner.step_inputs import flat_inputs

TARGETS = ("targets (issue 3, on an H100/H200): decode >= 80% of copy bandwidth at 64x4096, "
           "paging overhead <= 10%, prefill >= 70% of SDPA's TFLOP/s")


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", type=parse_grid, default="1x32k,16x4k,64x4k,256x1k",
                        help="decode cases, BATCHxCONTEXT, comma-separated (k = 1024)")
    parser.add_argument("--prefill-lens", type=parse_sizes, default="512,1k,2k,4k",
                        help="new tokens of each sequence of the ragged prefill batch")
    parser.add_argument("--prefix-len", type=parse_size, default="2k",
                        help="cached tokens before each sequence's new ones, in the second prefill case")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    add_common_flags(parser)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that `bench decode` shares."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the copy that measures bandwidth")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per case, after warm-up ones")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def parse_size(text: str) -> int:
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def add_engine_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the benchmarks that time a whole engine on a random-weight model."""
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",")]


def parse_grid(text: str) -> list[tuple[int, int]]:
    pairs = [part.lower().split("x") for part in text.split(",")]
    return [(parse_size(batch), parse_size(context)) for batch, context in pairs]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def timed(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Mean seconds per call of `fn`, after `warmup` untimed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def copy_bandwidth(device: torch.device, mib: int, reps: int, warmup: int) -> float:
    """Bytes per second of a device-to-device `copy_`, counting what it reads and what it writes."""
    src = torch.ones(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / timed(lambda: dst.copy_(src), device, reps, warmup)


def paged_batch(context_lens: list[int], query_lens: list[int], heads: Heads, device: torch.device):
    """Queries [T, Hq, D], K/V caches over shuffled blocks and the metadata of a ragged batch
    whose sequences' new tokens are the last `query_lens` of their `context_lens`: all decodes
    (one new token each) or all prefills."""
    counts = [-(-n // heads.block_size) for n in context_lens]
    pool = torch.randperm(sum(counts)).split(counts)
    chunks = [([0] * q, ctx - q, blocks.tolist()) for ctx, q, blocks in zip(context_lens, query_lens, pool)]
    _, _, meta = flat_inputs(chunks, heads.block_size, device)
    cache_shape = (sum(counts), heads.block_size, heads.num_kv_heads, heads.head_dim)
    k_cache, v_cache = (torch.randn(cache_shape, dtype=heads.dtype, device=device) for _ in range(2))
    q = torch.randn(sum(query_lens), heads.num_heads, heads.head_dim, dtype=heads.dtype, device=device)
    return q, k_cache, v_cache, meta


def contiguous(cache: torch.Tensor, meta: AttentionMetadata, seq: int) -> torch.Tensor:
    """Sequence `seq`'s keys or values out of the paged cache, as one [Hk, context, D] tensor."""
    context = meta.context_lens_cpu[seq]
    blocks = meta.block_tables[seq, : -(-context // cache.shape[1])]
    return cache[blocks].flatten(0, 1)[:context].transpose(0, 1).contiguous()


def check_same(paged: torch.Tensor, sdpa: torch.Tensor, case: str) -> None:
    """Error relative to the output's norm: averaged over long contexts, outputs are so small
    that an element-wise tolerance would pass zeros."""
    error = ((paged.float() - sdpa.float()).norm() / sdpa.float().norm()).item()
    if not error <= (1e-3 if paged.dtype == torch.float32 else 2e-2):  # NaN fails too
        raise ValueError(f"{case}: paged attention and SDPA disagree (relative error {error:.3g})")


def bench_decode_case(batch: int, context: int, heads: Heads, ops, device, args, copy_bps: float) -> dict:
    q, k_cache, v_cache, meta = paged_batch([context] * batch, [1] * batch, heads, device)
    keys, values = (torch.stack([contiguous(c, meta, i) for i in range(batch)]) for c in (k_cache, v_cache))
    # One query token per sequence: the query heads of each KV head become its query rows, so
    # SDPA reads each K/V head once, with no GQA expansion and no mask.
    grouped = q.view(batch, heads.num_kv_heads, -1, heads.head_dim)
    scale = heads.head_dim**-0.5

    def paged():
        return ops.paged_attention(q, k_cache, v_cache, meta, scale)

    def sdpa():
        return F.scaled_dot_product_attention(grouped, keys, values, scale=scale)

    check_same(paged(), sdpa().reshape(q.shape), f"decode {batch}x{context}")
    paged_s = timed(paged, device, args.reps, args.warmup)
    sdpa_s = timed(sdpa, device, args.reps, args.warmup)
    bytes_read = keys.nbytes + values.nbytes + 2 * q.nbytes  # K, V, the queries and the output
    return dict(
        batch=batch, context=context, paged_ms=paged_s * 1e3, mbytes=bytes_read / 1e6,
        gbps=bytes_read / paged_s / 1e9, copy_pct=100 * bytes_read / paged_s / copy_bps,
        sdpa_ms=sdpa_s * 1e3, overhead_pct=100 * (paged_s / sdpa_s - 1),
    )


def bench_prefill_case(query_lens: list[int], prefix: int, heads: Heads, ops, device, args) -> dict:
    context_lens = [prefix + n for n in query_lens]
    q, k_cache, v_cache, meta = paged_batch(context_lens, query_lens, heads, device)
    starts = meta.query_start_loc_cpu
    seqs = [
        (q[starts[i] : starts[i + 1]].transpose(0, 1)[None].contiguous(),
         contiguous(k_cache, meta, i)[None], contiguous(v_cache, meta, i)[None],
         causal_lower_right(query_lens[i], context_lens[i]))  # each new token sees its prefix and itself
        for i in range(len(query_lens))
    ]
    scale = heads.head_dim**-0.5

    def paged():
        return ops.paged_attention(q, k_cache, v_cache, meta, scale)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if device.type == "cuda" else nullcontext():
            return [F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
                    for qs, ks, vs, mask in seqs]

    check_same(paged(), torch.cat([out[0].transpose(0, 1) for out in sdpa()]),
               f"prefill {query_lens} after {prefix}")
    paged_s = timed(paged, device, args.reps, args.warmup)
    sdpa_s = timed(sdpa, device, args.reps, args.warmup)
    # QK^T and PV, 2 flops per multiply-add each, over the (query, key) pairs the mask keeps.
    pairs = sum(n * prefix + n * (n + 1) // 2 for n in query_lens)
    tflop = 4 * heads.num_heads * heads.head_dim * pairs / 1e12
    return dict(
        query_lens=",".join(map(str, query_lens)), prefix=prefix, paged_ms=paged_s * 1e3,
        tflops=tflop / paged_s, sdpa_ms=sdpa_s * 1e3, sdpa_tflops=tflop / sdpa_s, of_sdpa_pct=100 * sdpa_s / paged_s,
    )


def run_info(args: argparse.Namespace, device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "verb", "bench_verb")}
    return dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=name,
                torch=torch.__version__, settings=settings)


def print_info(info: dict, **extra) -> None:
    for key, value in {**info, **extra}.items():
        print(f"{key}: {value}")


def print_table(columns: dict[str, str], rows: list[dict]) -> None:
    """`rows` as a markdown table; `columns` maps each header to a format string over a row."""
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt.format(**row) for fmt in columns.values()) + " |")
    print()


def write_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)


def verdict(value: float, ok: bool) -> str:
    return f"{value:.1f} ({'met' if ok else 'missed'})"


def print_targets(decode: list[dict], prefill: list[dict]) -> None:
    print(TARGETS + ":")
    at = [r["copy_pct"] for r in decode if (r["batch"], r["context"]) == (64, 4096)]
    print(f"- decode at 64x4096, % of copy bandwidth: {verdict(at[0], at[0] >= 80) if at else 'not in --grid'}")
    worst = max(r["overhead_pct"] for r in decode)
    print(f"- paging overhead %, worst case: {verdict(worst, worst <= 10)}")
    least = min(r["of_sdpa_pct"] for r in prefill)
    print(f"- prefill, % of SDPA's TFLOP/s, lowest: {verdict(least, least >= 70)}")


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    heads = Heads(args.num_heads, args.num_kv_heads, args.head_dim, args.block_size, DTYPES[args.dtype])
    if heads.num_heads % heads.num_kv_heads:
        raise ValueError("--num-heads must be a multiple of --num-kv-heads")
    ops = get_ops(device)
    torch.manual_seed(0)
    copy_bps = copy_bandwidth(device, args.copy_mib, args.reps, args.warmup)
    info = run_info(args, device)
    print_info(info, kernels=ops.__name__, copy_bandwidth=f"{copy_bps / 1e9:.1f} GB/s (read + write)")
    decode = [bench_decode_case(b, c, heads, ops, device, args, copy_bps) for b, c in args.grid]
    print_table({
        "batch x context": "{batch}x{context}", "paged ms": "{paged_ms:.3f}", "MB read": "{mbytes:.1f}",
        "GB/s": "{gbps:.1f}", "% of copy BW": "{copy_pct:.1f}", "SDPA ms": "{sdpa_ms:.3f}",
        "paging overhead %": "{overhead_pct:+.1f}",
    }, decode)
    prefill = [bench_prefill_case(args.prefill_lens, p, heads, ops, device, args) for p in (0, args.prefix_len)]
    print_table({
        "new tokens per seq": "{query_lens}", "prefix": "{prefix}", "paged ms": "{paged_ms:.3f}",
        "TFLOP/s": "{tflops:.2f}", "SDPA ms": "{sdpa_ms:.3f}", "SDPA TFLOP/s": "{sdpa_tflops:.2f}",
        "% of SDPA": "{of_sdpa_pct:.1f}",
    }, prefill)
    print_targets(decode, prefill)
    write_json(args.json, dict(info, kernels=ops.__name__, copy_gbps=copy_bps / 1e9, decode=decode, prefill=prefill))
    return 0
