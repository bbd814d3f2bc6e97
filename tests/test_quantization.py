"""Quantized checkpoints (compressed-tensors, GPTQ, AWQ) against their reference decoders:
weights equal to what `compressed-tensors` decompresses, greedy tokens equal to transformers'."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.kernels.quant_reference import unpack_codes
from kvserve.workers.models.distributed import TPGroup
from kvserve.workers.models.loader import load_model
from kvserve.workers.models.parallel_layers import MergedLinear

# Wide enough for groups of 128 that a split over 2 ranks does not cut.
SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8, "head_dim": 32}
PRESETS = ["FP8", "FP8_DYNAMIC", "W4A16", "W4A16_ASYM", "W8A16"]
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("quant") / "llama", "llama", **SHAPE)


def write_compressed_tensors(base: Path, out: Path, preset: str) -> Path:
    """`base` quantized by `preset` and saved by compressed-tensors' own compressor, with
    min/max scales computed here (what a calibration tool would do) and a static input scale."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
        ignore=["lm_head"],
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None:
            _calibrate(module, scheme)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    _copy_tokenizer(base, out)
    return out


def _calibrate(module: torch.nn.Module, scheme) -> None:
    args, weight = scheme.weights, module.weight.data
    if args.strategy == "group":
        grouped = weight.unflatten(-1, (-1, args.group_size))
        low, high = grouped.amin(-1), grouped.amax(-1)
    elif args.strategy == "channel":
        low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    else:
        low, high = weight.amin(), weight.amax()
    scale, zero_point = calculate_qparams(low, high, args)
    module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
    if hasattr(module, "weight_zero_point"):
        zero_point = zero_point.reshape(module.weight_zero_point.shape)
        module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
    if scheme.input_activations is not None and not scheme.input_activations.dynamic:
        module.input_scale.data = torch.full_like(module.input_scale, 0.02)


def _copy_tokenizer(base: Path, out: Path) -> None:
    for path in base.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, out / path.name)


@pytest.fixture(scope="module")
def compressed(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compressed")
    return {preset: write_compressed_tensors(base, root / preset, preset) for preset in PRESETS}


def hf_model(model_dir: Path) -> torch.nn.Module:
    """transformers' model of the checkpoint in float32."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def decompressed(model_dir: Path) -> dict[str, torch.Tensor]:
    """Checkpoint linear name -> its weight as compressed-tensors' own decompressor gives it."""
    config = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    tensors = load_file(model_dir / "model.safetensors")
    modules = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".weight_scale")}
    return {
        module: compressor.decompress(
            {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == module}, scheme
        )["weight"]
        for module in modules
    }


def dense_reference(base: Path, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' model of `base` with its linear weights replaced by `weights`."""
    model = hf_model(base)
    model.load_state_dict({f"{name}.weight": w for name, w in weights.items()}, strict=False)
    return model


def our_weights(model) -> dict[str, torch.Tensor]:
    """Checkpoint linear name -> our weight, dequantized to float32, merged layers split apart."""
    weights = {}
    for name, module in model.named_modules():
        if not hasattr(module, "method"):
            continue
        weight = module.method.dequantized_weight(module, torch.float32)
        parent, leaf = name.rsplit(".", 1)
        if isinstance(module, MergedLinear):
            for part, piece in zip(MERGED[leaf], weight.split(module.output_sizes)):
                weights[f"model.{parent}.{part}"] = piece
        else:
            weights[f"model.{name}"] = weight
    return weights


PROMPTS = [[5, 77, 300, 12, 9], [100, 101, 102], list(range(20, 44))]


def hf_greedy(model, max_tokens: int = 10) -> list[list[int]]:
    with torch.inference_mode():
        return [
            model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False)[0, len(p):].tolist()
            for p in PROMPTS
        ]


def our_greedy(model_dir: Path, paged, max_tokens: int = 10, **options) -> list[list[int]]:
    """Prefill of every prompt in one batch, then batched decode steps over a paged cache."""
    model, config = load_model(model_dir, torch.float32, "cpu", **options)
    shape = (64, 8, config.num_kv_heads, config.head_dim)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
    seqs = [list(p) for p in PROMPTS]
    tables = paged.block_tables([len(p) + max_tokens for p in seqs], 8, 64)
    chunks = seqs
    for _ in range(max_tokens):
        lens = [len(s) for s in seqs]
        meta = paged.metadata(tables, lens, [len(c) for c in chunks], 8)
        positions = torch.tensor([p for n, c in zip(lens, chunks) for p in range(n - len(c), n)])
        with torch.inference_mode():
            hidden = model(torch.tensor([t for c in chunks for t in c]), positions, kv_caches, meta)
            logits = model.compute_logits(hidden[meta.query_start_loc[1:] - 1])
        chunks = [[int(token)] for token in logits.argmax(-1)]
        for seq, chunk in zip(seqs, chunks):
            seq.extend(chunk)
    return [seq[len(p):] for seq, p in zip(seqs, PROMPTS)]


@pytest.mark.parametrize("preset", PRESETS)
def test_compressed_tensors_weights_and_greedy_tokens_equal_the_reference(preset, base, compressed, paged):
    ours, _ = load_model(compressed[preset], torch.float32, "cpu")
    expected = decompressed(compressed[preset])
    got = our_weights(ours)
    assert got.keys() == expected.keys() and len(got) == 14
    for name, weight in got.items():
        assert torch.equal(weight, expected[name]), name
    # transformers 5 reinitializes packed zero points (their shape is not the module's): for
    # those, the reference is transformers running the decompressed weights.
    reference = dense_reference(base, expected) if preset == "W4A16_ASYM" else hf_model(compressed[preset])
    assert our_greedy(compressed[preset], paged) == hf_greedy(reference)


def test_quantized_weights_keep_their_dtypes_and_take_less_memory(base, compressed):
    dense, _ = load_model(base, torch.float32, "cpu")
    fp8, _ = load_model(compressed["FP8_DYNAMIC"], torch.float32, "cpu")
    int4, _ = load_model(compressed["W4A16"], torch.float32, "cpu")
    assert fp8.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert int4.layers[0].mlp.down_proj.qweight.dtype == torch.int32
    linear_bytes = {name: sum(p.nbytes for n, p in m.named_parameters() if "proj" in n)
                    for name, m in (("dense", dense), ("fp8", fp8), ("int4", int4))}
    assert linear_bytes["fp8"] < 0.3 * linear_bytes["dense"]
    assert linear_bytes["int4"] < 0.15 * linear_bytes["dense"]


def test_dequantize_setting_gives_dense_weights_with_the_same_tokens(compressed, paged):
    model, _ = load_model(compressed["W8A16"], torch.float32, "cpu", quantization="dequantize")
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    assert not hasattr(model.layers[0].self_attn.qkv_proj, "qweight")
    assert our_greedy(compressed["W8A16"], paged, quantization="dequantize") == hf_greedy(hf_model(compressed["W8A16"]))


def test_dummy_load_in_a_quantized_layout_runs(compressed, paged):
    model, config = load_model(compressed["W4A16"], torch.bfloat16, "cpu", load_format="dummy")
    assert model.layers[1].mlp.gate_up_proj.qweight.dtype == torch.int32
    shape = (16, 8, config.num_kv_heads, config.head_dim)
    kv = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))] * config.num_layers
    meta = paged.metadata(paged.block_tables([5], 8, 16), [5], [5], 8)
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.arange(3, 8), torch.arange(5), kv, meta))
    assert logits.isfinite().all() and logits.std() > 0


def pack_along_rows(codes: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[rows, cols] int4 codes -> [rows / 8, cols] int32: row 8w + order[i] in nibble i of word w."""
    words = torch.zeros(codes.shape[0] // 8, codes.shape[1], dtype=torch.int64)
    for nibble, row in enumerate(order):
        words |= codes[row::8].to(torch.int64) << (4 * nibble)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(codes, zeros, scales, group_size, g_idx=None) -> dict[str, torch.Tensor]:
    """AutoGPTQ's layout: codes packed along the inputs, zero points minus one packed along the outputs."""
    g_idx = torch.arange(codes.shape[1]) // group_size if g_idx is None else g_idx
    return {"qweight": pack_along_rows(codes.T), "qzeros": pack_along_rows(zeros - 1).T.contiguous(),
            "scales": scales.T.contiguous(), "g_idx": g_idx.to(torch.int32)}


AWQ_NIBBLES = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM order


def awq_tensors(codes, zeros, scales) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM layout: [in, out / 8] words along the outputs, outputs in AWQ_NIBBLES order."""
    return {"qweight": pack_along_rows(codes, AWQ_NIBBLES).T.contiguous(),
            "qzeros": pack_along_rows(zeros, AWQ_NIBBLES).T.contiguous(), "scales": scales.T.contiguous()}


def known_int4(out_features: int, in_features: int, group_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
    zeros = torch.randint(1, 16, (out_features, groups), generator=generator, dtype=torch.uint8)
    scales = torch.rand(out_features, groups, generator=generator) * 0.01 + 0.001
    return codes, zeros, scales


def test_gptq_and_awq_packings_unpack_to_the_known_values():
    from kvserve.workers.models.int_formats import int_tensor_specs
    from kvserve.workers.models.quant_config import IntScheme

    codes, zeros, scales = known_int4(24, 64, 32)
    scheme = IntScheme(4, 32)
    for fmt, tensors in (("gptq", gptq_tensors(codes, zeros, scales, 32)), ("awq", awq_tensors(codes, zeros, scales))):
        specs = int_tensor_specs(fmt, scheme, zeros_offset=1 if fmt == "gptq" else 0)
        assert torch.equal(unpack_codes(specs["qweight"].convert(tensors["qweight"]), 4), codes), fmt
        assert torch.equal(specs["qzeros"].convert(tensors["qzeros"]), zeros), fmt
        assert torch.equal(specs["scales"].convert(tensors["scales"]), scales), fmt



def ct_int4_values(tensors: dict[str, torch.Tensor], module: str):
    """(codes, zero codes, scales) of one module of an asymmetric compressed-tensors int4 checkpoint."""
    shape = tuple(tensors[f"{module}.weight_shape"].tolist())
    scales = tensors[f"{module}.weight_scale"]
    codes = (unpack_from_int32(tensors[f"{module}.weight_packed"], 4, shape) + 8).to(torch.uint8)
    zero_shape = (shape[0], scales.shape[1])
    zeros = (unpack_from_int32(tensors[f"{module}.weight_zero_point"], 4, zero_shape, packed_dim=0) + 8)
    return codes, zeros.to(torch.uint8), scales


def rewrite_int4(ct_dir: Path, out: Path, fmt: str, group_size: int = 128, desc_act: bool = False) -> Path:
    """The compressed-tensors checkpoint's int4 values written as GPTQ or AWQ."""
    out.mkdir()
    tensors = load_file(ct_dir / "model.safetensors")
    modules = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".weight_packed")}
    rewritten = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in modules}
    for module in modules:
        values = ct_int4_values(tensors, module)
        packed = gptq_tensors(*values, group_size) if fmt == "gptq" else awq_tensors(*values)
        rewritten.update({f"{module}.{k}": v for k, v in packed.items()})
    save_file(rewritten, out / "model.safetensors")
    config = json.loads((ct_dir / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": False,
         "checkpoint_format": "gptq"} if fmt == "gptq"
        else {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    )
    (out / "config.json").write_text(json.dumps(config))
    _copy_tokenizer(ct_dir, out)
    return out


@pytest.fixture(scope="module")
def int4_formats(compressed, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int4")
    ct = compressed["W4A16_ASYM"]
    return {"compressed-tensors": ct, "gptq": rewrite_int4(ct, root / "gptq", "gptq"),
            "awq": rewrite_int4(ct, root / "awq", "awq")}


def test_the_same_int4_weights_as_gptq_awq_and_compressed_tensors_give_identical_outputs(int4_formats, paged):
    prompt = torch.tensor(PROMPTS[2])
    meta = paged.metadata(paged.block_tables([len(prompt)], 8, 64), [len(prompt)], [len(prompt)], 8)
    logits = {}
    for fmt, model_dir in int4_formats.items():
        model, config = load_model(model_dir, torch.float32, "cpu")
        shape = (64, 8, config.num_kv_heads, config.head_dim)
        kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
        with torch.inference_mode():
            logits[fmt] = model.compute_logits(model(prompt, torch.arange(len(prompt)), kv, meta))
    assert torch.equal(logits["gptq"], logits["compressed-tensors"])
    assert torch.equal(logits["awq"], logits["compressed-tensors"])
    assert our_greedy(int4_formats["gptq"], paged) == our_greedy(int4_formats["awq"], paged)


def test_gptq_activation_order_reads_each_inputs_group_from_g_idx(base, tmp_path):
    """Every linear layer from known int4 values whose inputs are assigned to groups at random."""
    tensors = load_file(base / "model.safetensors")
    expected = {}
    for seed, name in enumerate(k for k in list(tensors) if k.startswith("model.layers") and k.endswith("proj.weight")):
        module = name.removesuffix(".weight")
        out_features, in_features = tensors.pop(name).shape
        codes, zeros, scales = known_int4(out_features, in_features, 32, seed)
        # Projections of the same input share their order (GPTQ's comes from that input's statistics).
        input_seed = in_features + module.endswith(("o_proj", "down_proj"))
        g_idx = torch.randperm(in_features, generator=torch.Generator().manual_seed(input_seed)) // 32
        tensors.update({f"{module}.{k}": v for k, v in gptq_tensors(codes, zeros, scales, 32, g_idx).items()})
        expected[module] = (codes.float() - zeros[:, g_idx].float()) * scales[:, g_idx]
    (tmp_path / "ckpt").mkdir()
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    model, _ = load_model(tmp_path / "ckpt", torch.float32, "cpu")
    got = our_weights(model)
    assert got.keys() == expected.keys()
    for module, weight in got.items():
        assert torch.equal(weight, expected[module]), module


ROW_PARALLEL = ("o_proj", "down_proj")


@pytest.mark.parametrize("fmt", ["FP8", "FP8_DYNAMIC", "W4A16", "W4A16_ASYM", "gptq", "awq"])
def test_two_ranks_shards_put_together_are_the_whole_weights(fmt, compressed, int4_formats):
    """Each rank reads only its slices of packed codes, scales and zero points; side by side
    (outputs of column-parallel layers, inputs of row-parallel ones) they are the tp 1 weights."""
    model_dir = int4_formats.get(fmt) or compressed[fmt]
    whole = our_weights(load_model(model_dir, torch.float32, "cpu")[0])
    ranks = [our_weights(load_model(model_dir, torch.float32, "cpu", tp=TPGroup(rank, 2))[0]) for rank in (0, 1)]
    for name, weight in whole.items():
        dim = 1 if name.endswith(ROW_PARALLEL) else 0
        assert torch.equal(torch.cat([rank[name] for rank in ranks], dim=dim), weight), name


def test_a_split_that_cuts_a_group_is_refused(compressed):
    with pytest.raises(ValueError, match="must not cut a group"):
        load_model(compressed["W4A16"], torch.float32, "cpu", tp=TPGroup(0, 4))


def test_the_runner_logs_its_weight_and_kv_memory_once(compressed, caplog):
    from kvserve.workers.engine.config import EngineConfig
    from kvserve.workers.runner.model_runner import ModelRunner

    serve_logger = logging.getLogger("ray.serve")  # Serve may have stopped it from propagating
    serve_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            ModelRunner(EngineConfig(model=str(compressed["W4A16"]), device="cpu", dtype="float32", num_kv_blocks=24))
    finally:
        serve_logger.removeHandler(caplog.handler)
    (message,) = {r.getMessage() for r in caplog.records if "KV cache" in r.getMessage()}
    assert message.startswith("rank 0 of 1 on cpu: weights 0.00 GiB, KV cache 0.00 GiB (24 blocks of 16 tokens, float32)")
