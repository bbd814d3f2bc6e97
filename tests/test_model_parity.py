"""Our decoder, loaded by our loader, against Hugging Face transformers on the same checkpoints."""

import json
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.workers.models.loader import load_model
from kvserve.workers.models.config import SUPPORTED_ARCHITECTURES, ModelConfig

BLOCK_SIZE, NUM_BLOCKS = 8, 64
VARIANTS = {  # name -> (arch, overrides)
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-rope-llama3": (
        "llama",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    ),
    "llama-sharded": ("llama", {"max_shard_size": "100KB"}),
}
MODELS = ["llama", "mistral", "qwen2", "qwen3", *VARIANTS]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    variants = {name: build_tiny_checkpoint(root / name, arch, **o) for name, (arch, o) in VARIANTS.items()}
    return {**tiny_checkpoints, **variants}


class PagedModel:
    """Our model with its own KV cache; each sequence keeps a randomly placed block table."""

    def __init__(self, model_dir, paged, lengths: list[int]):
        self.model, config = load_model(model_dir, torch.float32, torch.device("cpu"))
        shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
        self.tables = paged.block_tables(lengths, BLOCK_SIZE, NUM_BLOCKS)
        self.paged = paged

    @torch.inference_mode()
    def step(self, seqs: list[int], chunks: list[list[int]], context_lens: list[int]) -> list[torch.Tensor]:
        """Feeds `chunks[i]`, the tokens ending at context_lens[i], of sequence `seqs[i]`;
        returns the logits of each chunk."""
        query_lens = [len(c) for c in chunks]
        meta = self.paged.metadata([self.tables[s] for s in seqs], context_lens, query_lens, BLOCK_SIZE)
        input_ids = torch.tensor([t for c in chunks for t in c])
        positions = torch.tensor([p for ctx, q in zip(context_lens, query_lens) for p in range(ctx - q, ctx)])
        logits = self.model.compute_logits(self.model(input_ids, positions, self.kv_caches, meta))
        return list(logits.split(query_lens))


def hf_logits(model_dir, prompts: list[list[int]]) -> list[torch.Tensor]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [hf(torch.tensor([p])).logits[0].float() for p in prompts]


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_prefill_batch_matches_hf(name, checkpoints, paged):
    lengths = [1, 19, 8, 40, 3, 16]  # one token, mid-block and block-boundary ends
    prompts = random_prompts(lengths)
    ours = PagedModel(checkpoints[name], paged, lengths)
    got = ours.step(list(range(len(prompts))), prompts, lengths)
    for logits, expected in zip(got, hf_logits(checkpoints[name], prompts)):
        assert_logits_close(logits, expected)


@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill_then_decode_matches_hf(name, checkpoints, paged):
    prompts = random_prompts([21, 40, 9], seed=1)
    decode_steps = 4
    ours = PagedModel(checkpoints[name], paged, [len(p) + decode_steps for p in prompts])
    seqs = [list(p) for p in prompts]
    fed = [0, 0, 0]
    logits: list[list[torch.Tensor]] = [[], [], []]

    def run(plan: list[tuple[int, int]]) -> None:
        """plan: (sequence, how many of its next tokens to feed), decodes first."""
        ids = [s for s, _ in plan]
        chunks = [seqs[s][fed[s] : fed[s] + n] for s, n in plan]
        for s, n in plan:
            fed[s] += n
        for s, out in zip(ids, ours.step(ids, chunks, [fed[s] for s in ids])):
            logits[s].append(out)

    def append_argmax(ids: list[int]) -> None:
        for s in ids:
            seqs[s].append(int(logits[s][-1][-1].argmax()))

    run([(0, 13), (1, 16)])  # first chunks; sequence 1's ends on a block boundary
    run([(0, 8), (1, 24)])
    append_argmax([0, 1])
    run([(0, 1), (1, 1), (2, 9)])  # decodes batched with a whole prompt
    for _ in range(decode_steps - 1):
        append_argmax([0, 1, 2])
        run([(0, 1), (1, 1), (2, 1)])

    expected = hf_logits(checkpoints[name], [seq[:n] for seq, n in zip(seqs, fed)])
    for got, want in zip(logits, expected):
        assert_logits_close(torch.cat(got), want)


def copy_checkpoint(checkpoints, tmp_path, name="llama"):
    return shutil.copytree(checkpoints[name], tmp_path / name)


def test_missing_config_json(checkpoints, tmp_path):
    model_dir = copy_checkpoint(checkpoints, tmp_path)
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"config.json.*{re.escape(str(model_dir))}"):
        load_model(model_dir, torch.float32, "cpu")


def test_no_safetensors(checkpoints, tmp_path):
    model_dir = copy_checkpoint(checkpoints, tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"\*\.safetensors.*{re.escape(str(model_dir))}"):
        load_model(model_dir, torch.float32, "cpu")


def test_unknown_architecture_lists_supported(checkpoints, tmp_path):
    model_dir = copy_checkpoint(checkpoints, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as error:
        load_model(model_dir, torch.float32, "cpu")
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES)


def test_missing_and_unexpected_weights_are_named(checkpoints, tmp_path):
    model_dir = copy_checkpoint(checkpoints, tmp_path)
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}, path)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight\[1\]"):
        load_model(model_dir, torch.float32, "cpu")
    save_file({**weights, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_model(model_dir, torch.float32, "cpu")


def test_dummy_load_has_checkpoint_shapes_without_weights(checkpoints, tmp_path):
    model_dir = copy_checkpoint(checkpoints, tmp_path, "qwen3")
    real, _ = load_model(model_dir, torch.float32, "cpu")
    (model_dir / "model.safetensors").unlink()
    dummy, _ = load_model(model_dir, torch.bfloat16, "cpu", load_format="dummy")
    shapes = {name: p.shape for name, p in real.named_parameters()}
    assert {name: p.shape for name, p in dummy.named_parameters()} == shapes
    assert all(p.dtype == torch.bfloat16 for p in dummy.parameters())
    assert (dummy.layers[0].self_attn.q_norm.weight == 1).all()
    assert 0.01 < dummy.embed_tokens.weight.float().std().item() < 0.03


def test_bfloat16_load_runs(checkpoints, paged):
    model, config = load_model(checkpoints["qwen2"], torch.bfloat16, "cpu")
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    kv_caches = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
                 for _ in range(config.num_layers)]
    meta = paged.metadata(paged.block_tables([5], BLOCK_SIZE, NUM_BLOCKS), [5], [5], BLOCK_SIZE)
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.arange(3, 8), torch.arange(5), kv_caches, meta))
    assert logits.dtype == torch.float32 and logits.isfinite().all()


def test_config_reads_transformers_4_and_5_rope_layouts():
    common = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 128, "eos_token_id": [1, 7],
    }
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    v4 = ModelConfig.from_dict({**common, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    v5 = ModelConfig.from_dict(
        {**common, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
    )
    assert v4 == v5
    assert v5.rope_theta == 5e5 and v5.rope_scaling == {"rope_type": "llama3", **scaling}
    assert v5.eos_token_ids == (1, 7) and v5.head_dim == 16 and v5.num_kv_heads == 4
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict({**common, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_tiny_checkpoint_is_reused_only_for_the_same_spec(tmp_path):
    model_dir = build_tiny_checkpoint(tmp_path / "tiny", "qwen2")
    built_at = (model_dir / "model.safetensors").stat().st_mtime_ns
    build_tiny_checkpoint(model_dir, "qwen2")
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == built_at
    build_tiny_checkpoint(model_dir, "qwen2", tie_word_embeddings=True)
    assert ModelConfig.from_pretrained_dir(model_dir).tie_word_embeddings
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError):
        build_tiny_checkpoint(tmp_path / "other", "llama")
