"""How long one engine step takes, without running the model: the only part of a replica the
simulator replaces.

Two kinds of model. `Roofline` derives the time from the hardware and the model's shape: a
step reads every weight once and the KV of every context token it attends over, and does
2 x params FLOPs per new token plus the attention's; it is bound by whichever of memory
traffic and arithmetic takes longer, each at an efficiency below the datasheet peak, plus a
fixed per-step overhead and, at tensor parallelism, two all-reduces per layer. The presets
pair H100 and H200 with Llama-3-8B, Qwen3-32B and Llama-3-70B at tp 1, 2, 4 and 8 (those that
fit). `LinearStepTime` is fitted by least squares to steps measured on our own engine, so the
simulator can be calibrated against it rather than against a datasheet.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GB = 1e9
GIB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: float
    bandwidth: float  # HBM bytes/s
    flops: float  # dense bf16 FLOP/s
    link_bandwidth: float  # NVLink bytes/s, one direction


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


# Datasheet numbers: H100 SXM5 80 GB and H200 141 GB (both 989 TFLOP/s dense bf16, NVLink 4).
GPUS = {
    "h100": Gpu("H100-SXM", 80 * GB, 3.35e12, 989e12, 450 * GB),
    "h200": Gpu("H200-SXM", 141 * GB, 4.8e12, 989e12, 450 * GB),
}
# Shapes from the models' config.json files.
MODELS = {
    "llama3-8b": ModelShape("Llama-3-8B", 8.03e9, 32, 4096, 32, 8, 128),
    "qwen3-32b": ModelShape("Qwen3-32B", 32.8e9, 64, 5120, 64, 8, 128),
    "llama3-70b": ModelShape("Llama-3-70B", 70.6e9, 80, 8192, 64, 8, 128),
}
TP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Roofline:
    """time = overhead + max(bytes / (bandwidth x mem_efficiency), FLOPs / (peak x
    compute_efficiency)) + all-reduce time, per GPU of a tp group."""

    gpu: Gpu
    model: ModelShape
    tp: int = 1
    mem_efficiency: float = 0.8
    compute_efficiency: float = 0.6
    step_overhead_s: float = 0.001
    allreduce_latency_s: float = 10e-6
    memory_utilization: float = 0.9  # as the engine's gpu_memory_utilization
    activation_reserve_bytes: float = 2 * GIB

    def __post_init__(self) -> None:
        # The formula's constant factors, worked out once: a simulation asks for the time of
        # every step. Integer factors are exact and the float ones are those the formula
        # computes first, so the times are the same to the last bit.
        model, gpu, tp = self.model, self.gpu, self.tp
        object.__setattr__(self, "_factors", (
            model.kv_bytes_per_token, model.weight_bytes, gpu.bandwidth * self.mem_efficiency, 2 * model.params,
            4 * model.layers * model.q_heads * model.head_dim, gpu.flops * self.compute_efficiency,
            model.hidden * model.dtype_bytes * 2 * (tp - 1), 2 * model.layers))

    def __call__(self, prefill_tokens: int, decode_seqs: int, context_tokens: int,
                 attention_pairs: int | None = None) -> float:
        """Seconds for a step computing `prefill_tokens` prompt tokens and one token for each
        of `decode_seqs` sequences, attending over `context_tokens` cached tokens in all;
        `attention_pairs` (query x key pairs; default: `context_tokens`) sets the attention FLOPs."""
        (kv_bytes_per_token, weight_bytes, bandwidth, flops_per_token, flops_per_pair, flops,
         ring_bytes_per_token, allreduces) = self._factors
        tp = self.tp
        tokens = prefill_tokens + decode_seqs
        memory_s = (weight_bytes + (context_tokens + tokens) * kv_bytes_per_token) / tp / bandwidth
        pairs = context_tokens if attention_pairs is None else attention_pairs
        compute_s = (flops_per_token * tokens + flops_per_pair * pairs) / tp / flops
        # Two ring all-reduces of the activations per layer (after attention and the MLP).
        ring_s = tokens * ring_bytes_per_token / tp / self.gpu.link_bandwidth
        allreduce_s = allreduces * (self.allreduce_latency_s + ring_s) if tp > 1 else 0.0
        return self.step_overhead_s + max(memory_s, compute_s) + allreduce_s

    def kv_blocks(self, block_size: int) -> int:
        """Blocks of the KV pool: what each GPU has left after its share of the weights and
        the activations, in tokens of its share of the KV."""
        free = self.gpu.memory_bytes * self.memory_utilization - self.model.weight_bytes / self.tp
        free -= self.activation_reserve_bytes
        return max(0, int(free // (self.model.kv_bytes_per_token / self.tp)) // block_size)


def _presets() -> dict[str, Roofline]:
    presets = {}
    for gpu_key, gpu in GPUS.items():
        for model_key, model in MODELS.items():
            for tp in TP_SIZES:
                roofline = Roofline(gpu, model, tp)
                if roofline.kv_blocks(16) * 16 >= 8192:  # room for one long prompt at least
                    presets[f"{gpu_key}-{model_key}-tp{tp}"] = roofline
    return presets


PRESETS = _presets()


@dataclass(frozen=True)
class LinearStepTime:
    """time = base_s + per_prefill_token_s x prefill tokens + per_decode_seq_s x decode
    sequences + per_context_token_s x context tokens, fitted to measured steps."""

    base_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    kv_blocks_measured: int | None = None  # the measured engine's pool, if the file says

    def __call__(self, prefill_tokens: int, decode_seqs: int, context_tokens: int,
                 attention_pairs: int | None = None) -> float:
        return max(0.0, self.base_s + self.per_prefill_token_s * prefill_tokens
                   + self.per_decode_seq_s * decode_seqs + self.per_context_token_s * context_tokens)

    def kv_blocks(self, block_size: int) -> int:
        if self.kv_blocks_measured is None:
            raise ValueError("the step-time fit file has no num_kv_blocks: give --kv-blocks")
        return self.kv_blocks_measured


POINT_KEYS = ("prefill_tokens", "decode_seqs", "context_tokens", "step_s")


def step_counts(seqs, num_new_tokens: list[int]) -> tuple[int, int, int, int]:
    """A scheduled batch as the step-time model reads it: prompt tokens computed, sequences
    decoding (one new token after the prompt), the tokens already computed that the step
    attends over, and its attention pairs; `seqs` as the scheduler left them, before the step
    advances them."""
    prefill = decode = context = pairs = 0
    for seq, num_new in zip(seqs, num_new_tokens):
        done = seq.num_computed_tokens
        context += done
        if num_new == 1 and done >= seq.num_prompt_tokens:
            decode += 1
            pairs += done + 1
        else:
            prefill += num_new
            pairs += num_new * done + num_new * (num_new + 1) // 2
    return prefill, decode, context, pairs


def step_composition(seqs, num_new_tokens: list[int]) -> dict[str, int]:
    """`step_counts` as a measured step point records it (the fit reads no attention pairs)."""
    prefill, decode, context, _ = step_counts(seqs, num_new_tokens)
    return {"prefill_tokens": prefill, "decode_seqs": decode, "context_tokens": context}


def relative_errors(model, points: list[dict]) -> list[float]:
    """|modelled - measured| / measured of each measured step."""
    return [abs(model(p["prefill_tokens"], p["decode_seqs"], p["context_tokens"]) - p["step_s"]) / p["step_s"]
            for p in points]


def fit_step_time(points: list[dict], kv_blocks: int | None = None) -> LinearStepTime:
    """Least squares over measured steps, each a dict with POINT_KEYS."""
    if len(points) < 4:
        raise ValueError(f"a step-time fit needs at least 4 measured steps, got {len(points)}")
    rows = np.array([[1.0, p["prefill_tokens"], p["decode_seqs"], p["context_tokens"]] for p in points])
    times = np.array([p["step_s"] for p in points], dtype=float)
    coef, *_ = np.linalg.lstsq(rows, times, rcond=None)
    return LinearStepTime(*(float(c) for c in coef), kv_blocks_measured=kv_blocks)


def load_step_fit(path: str | Path) -> LinearStepTime:
    """A fit of the JSON file: {"points": [{prefill_tokens, decode_seqs, context_tokens,
    step_s}, ...], "num_kv_blocks": N (optional)}, or just the list of points."""
    data = json.loads(Path(path).read_text())
    points = data["points"] if isinstance(data, dict) else data
    missing = [k for k in POINT_KEYS if any(k not in p for p in points)]
    if missing:
        raise ValueError(f"{path}: every measured step needs {', '.join(POINT_KEYS)}; missing {missing[0]}")
    return fit_step_time(points, data.get("num_kv_blocks") if isinstance(data, dict) else None)


def step_time_model(preset: str | None, fit_path: str | None):
    """The model the command line asks for: a fit file wins over a preset."""
    if fit_path:
        return load_step_fit(fit_path)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[preset]
