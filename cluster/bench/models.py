"""The random-weight models the benchmarks run when given none, built on first use in a cache
folder and kept there."""

from pathlib import Path

from kvserve.cluster.tiny_model import build_tiny_checkpoint

BENCH_MODEL_SHAPE = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
)

ROUTER_BENCH_SHAPE = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
)


def bench_model(cache_dir: Path) -> str:
    """A small random-weight Llama for engine benchmarks: big enough that the model's work,
    not Python, fills most of a step on a CPU."""
    return str(build_tiny_checkpoint(cache_dir / "bench-llama", arch="llama", **BENCH_MODEL_SHAPE))


def router_bench_model(cache_dir: Path) -> str:
    """A small random-weight Llama whose prefill costs enough on a CPU core for the router to
    matter, with room for long conversations."""
    return str(build_tiny_checkpoint(cache_dir / "router-bench-llama", arch="llama", **ROUTER_BENCH_SHAPE))


def bench_lora_adapters(base_dir: str, cache_dir: Path, count: int, rank: int = 8) -> dict[str, str]:
    """`count` PEFT LoRA adapters of random A and B (not PEFT's zero B) on every projection of
    `base_dir`, built on first use beside it: name -> folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {f"lora-{k}": cache_dir / f"{Path(base_dir).name}-lora-{k}" for k in range(count)}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for seed, folder in enumerate(folders.values()):
        if not (folder / "adapter_config.json").exists():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
            get_peft_model(model, config).save_pretrained(folder)
    return {name: str(folder) for name, folder in folders.items()}
