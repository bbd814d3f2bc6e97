"""`kvserve bench decode`: the engine's decode step on a Llama-3-8B-shaped model with dummy
weights (dense, or in an FP8 or int4 checkpoint's layout), against the floor of reading every
weight and the batch's KV once at the measured copy bandwidth, and against Hugging Face
transformers' `generate` on the same device."""

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvserve.cluster.bench.kernels import (
    add_common_flags, copy_bandwidth, parse_sizes, print_info, print_table, resolve_device, run_info,
    write_json,
)
from kvserve.cluster.bench.tp import decode_step_time, release_device_memory
from kvserve.workers.models.config import DTYPES

BLOCK_SIZE = 16
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    # Llama-3.2-1B's shape (its head untied: a decode step reads the same bytes), a draft for llama3-8b.
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=32.0)),
    "host-overhead": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=512, max_position_embeddings=16384,
                          rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=16384,
                 rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
}
# `quantization_config`s of compressed-tensors checkpoints: FP8 weights per channel with dynamic
# per-token FP8 activations, and int4 weights in groups (of 128, or of the hidden size if smaller).
FORMATS = ("dense", "fp8", "int4")
FP8_WEIGHTS = dict(type="float", num_bits=8, strategy="channel", symmetric=True, dynamic=False)
FP8_TOKENS = dict(type="float", num_bits=8, strategy="token", symmetric=True, dynamic=True)
HF_NOTE = ("HF: the same config built by transformers with random weights on the same device and dtype "
           "(the work of a step does not depend on the values), its defaults (sdpa attention, dynamic "
           "cache), greedy; for both, only decode steps after the first two tokens are timed, prefill excluded")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--batches", type=parse_sizes, default="1,16,64,256")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens of every sequence")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-engine", action="store_true", help="HF's steps alone")
    parser.add_argument("--enforce-eager", action="store_true", help="decode steps without CUDA graphs")
    parser.add_argument("--quantization", type=_formats, default="dense",
                        help=f"weight formats measured one after another, of: {', '.join(FORMATS)}")
    add_common_flags(parser)


def _formats(text: str) -> list[str]:
    formats = text.split(",")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown formats {', '.join(sorted(unknown))}; of: {', '.join(FORMATS)}")
    return formats


@contextmanager
def random_model_run(args: argparse.Namespace, **shown) -> Iterator[tuple[str, torch.device, dict]]:
    """An engine benchmark's setting up (the flags of `add_engine_run_flags`): torch's threads
    set, the run's facts printed (with `shown`), and a temporary folder holding a config-only
    checkpoint of `args.shape`. Yields the folder, the device and the run's facts."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = run_info(args, device)
    print_info(info, torch_threads=args.threads, **shown)
    with tempfile.TemporaryDirectory(prefix=f"kvserve-{args.shape}-") as model_dir:
        write_config_only_checkpoint(Path(model_dir), args.shape)
        yield model_dir, device, info


def write_config_only_checkpoint(out_dir: Path, shape: str, quantization: str = "dense") -> None:
    """config.json and a tokenizer, no weights: all that `load_format: dummy` reads."""
    from transformers import LlamaConfig

    from kvserve.cluster.tiny_model import ARCHITECTURES, build_tokenizer

    tokenizer = build_tokenizer(out_dir)
    config = LlamaConfig(
        **SHAPES[shape], architectures=[ARCHITECTURES["llama"]], tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if quantization != "dense":
        config.quantization_config = quantization_config(quantization, SHAPES[shape]["hidden_size"])
    config.save_pretrained(out_dir)


def quantization_config(quantization: str, hidden_size: int) -> dict:
    if quantization == "fp8":
        scheme = dict(weights=FP8_WEIGHTS, input_activations=FP8_TOKENS)
    else:
        scheme = dict(weights=dict(type="int", num_bits=4, strategy="group", group_size=min(128, hidden_size),
                                   symmetric=True))
    return dict(quant_method="compressed-tensors", config_groups=dict(group_0=dict(targets=["Linear"], **scheme)),
                ignore=["lm_head"])


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: all but the input embedding, of which it reads
    only the batch's rows (unless tied to the output head, which reads it whole)."""
    total = sum(p.nbytes for p in model.parameters())
    return total if model.config.tie_word_embeddings else total - model.embed_tokens.weight.nbytes


def engine_rows(model_dir: str, args, device: torch.device, copy_bps: float, quantization: str) -> list[dict]:
    from kvserve.workers.llm import LLM

    max_len = args.context + args.steps + 2  # decode_step_time generates steps + 2 tokens
    blocks_per_seq = -(-max_len // BLOCK_SIZE) + 1
    llm = LLM(model_dir, device=device.type, dtype=args.dtype, load_format="dummy", max_model_len=max_len,
              block_size=BLOCK_SIZE, max_num_seqs=max(args.batches),
              num_kv_blocks=max(args.batches) * blocks_per_seq, enforce_eager=args.enforce_eager)
    runner = llm.engine.runner
    mc = runner.model_config
    weights = weight_bytes(runner.model)
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * runner.dtype.itemsize
    # The timed steps read contexts of context + 2 to context + steps + 1 tokens.
    mean_context = args.context + (args.steps + 3) / 2
    rows = []
    for batch in args.batches:
        step_s = decode_step_time(llm, batch, args.context, args.steps)
        floor_s = (weights + batch * mean_context * kv_per_token) / copy_bps
        rows.append(dict(format=quantization, batch=batch, context=args.context, step_ms=step_s * 1e3,
                         floor_ms=floor_s * 1e3, of_floor=step_s / floor_s, tok_s=batch / step_s))
        print(f"engine, {quantization}, batch {batch}: {step_s * 1e3:.2f} ms per step", flush=True)
    print(f"{quantization}: weights read per step: {weights / 1e6:.1f} MB, KV per token: {kv_per_token} bytes")
    return rows


def hf_step_time(hf, batch: int, context: int, steps: int, device: torch.device) -> float:
    """Mean seconds of HF's decode steps, timed like `decode_step_time`: after two tokens."""
    from transformers import StoppingCriteriaList

    clock = _StepClock(device)
    ids = torch.randint(3, hf.config.vocab_size, (batch, context), device=device)
    with torch.inference_mode():
        hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 2,
                    min_new_tokens=steps + 2, do_sample=False, pad_token_id=hf.config.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([clock]))
    return (clock.times[-1] - clock.times[1]) / steps


class _StepClock:
    """A stopping criterion that never stops: it stamps the time as each token comes out."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def add_hf_columns(rows: list[dict], model_dir: str, args, device: torch.device) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype]).eval()
    for row in rows:
        try:
            step_s = hf_step_time(hf, row["batch"], args.context, args.steps, device)
        except torch.OutOfMemoryError:
            step_s = float("nan")
            print(f"HF, batch {row['batch']}: out of memory")
        row.update(hf_step_ms=step_s * 1e3, hf_tok_s=row["batch"] / step_s)
        if "tok_s" in row:
            row["vs_hf"] = row["tok_s"] / row["hf_tok_s"]


def main(args: argparse.Namespace) -> int:
    if args.skip_engine and args.skip_hf:
        raise ValueError("--skip-engine and --skip-hf leave nothing to measure")
    if not args.skip_hf and args.quantization != ["dense"]:
        raise ValueError("HF's decode step is measured on the dense model alone: add --skip-hf")
    device = resolve_device(args.device)
    copy_bps = copy_bandwidth(device, args.copy_mib, args.reps, args.warmup)
    info = run_info(args, device)
    print_info(info, copy_bandwidth=f"{copy_bps / 1e9:.1f} GB/s (read + write)")
    rows = []
    for quantization in args.quantization:
        with tempfile.TemporaryDirectory(prefix=f"kvserve-{args.shape}-{quantization}-") as model_dir:
            write_config_only_checkpoint(Path(model_dir), args.shape, quantization)
            rows += measured_rows(model_dir, args, device, copy_bps, quantization)
    print_table(table_columns(args), rows)
    print_notes(args, rows)
    write_json(args.json, dict(info, copy_gbps=copy_bps / 1e9, decode=rows))
    return 0


def measured_rows(model_dir: str, args, device: torch.device, copy_bps: float, quantization: str) -> list[dict]:
    if args.skip_engine:
        rows = [dict(format=quantization, batch=batch, context=args.context) for batch in args.batches]
    else:
        rows = engine_rows(model_dir, args, device, copy_bps, quantization)
        release_device_memory(device)  # the engine's weights and KV pool, before HF's are allocated
    if not args.skip_hf:
        add_hf_columns(rows, model_dir, args, device)
    return rows


def table_columns(args: argparse.Namespace) -> dict[str, str]:
    columns = {"format": "{format}", "batch": "{batch}", "context": "{context}"}
    if not args.skip_engine:
        columns |= {"step ms": "{step_ms:.2f}", "floor ms": "{floor_ms:.2f}", "step / floor": "{of_floor:.2f}x",
                    "tok/s": "{tok_s:.1f}"}
    if not args.skip_hf:
        columns |= {"HF step ms": "{hf_step_ms:.2f}", "HF tok/s": "{hf_tok_s:.1f}"}
    if not (args.skip_engine or args.skip_hf):
        columns["vs HF"] = "{vs_hf:.2f}x"
    return columns


def print_notes(args: argparse.Namespace, rows: list[dict]) -> None:
    if not args.skip_hf:
        print(HF_NOTE)
    if args.skip_engine:
        return
    print("floor = (weight bytes + KV bytes read at the mean context of the timed steps) / copy bandwidth")
    for quantization in args.quantization:
        at_1 = [r["of_floor"] for r in rows if r["batch"] == 1 and r["format"] == quantization]
        result = f"{at_1[0]:.2f}x ({'met' if at_1[0] <= 1.25 else 'missed'})" if at_1 else "batch 1 not in --batches"
        print(f"target (issue 3, on an H100/H200), {quantization}: batch-1 step within 1.25x of the floor: {result}")
