"""GGUF checkpoints against their reference readers: greedy tokens equal to transformers loading
the same file (`gguf_file=`), tensors decoded exactly as `gguf.quants.dequantize` decodes them."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_writer import write_gguf
from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.gguf_checkpoint import tokenizer_args
from kvserve.workers.models.gguf_quants import dequantize
from test_quantization import hf_greedy, our_greedy

# transformers reads no head_dim from a Qwen3 file and takes Qwen3's default of 128.
SHAPES = {"qwen3": {"head_dim": 128}}
FILES = [("llama", T.F16), ("llama", T.Q8_0), ("llama", T.Q4_0),
         ("mistral", T.Q8_0), ("qwen2", T.Q4_0), ("qwen3", T.Q8_0)]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[tuple[str, T], Path]:
    root = tmp_path_factory.mktemp("gguf")
    bases = {arch: build_tiny_checkpoint(root / arch, arch, **SHAPES.get(arch, {})) for arch, _ in FILES}
    files = {}
    for arch, qtype in FILES:
        folder = root / f"{arch}-{qtype.name}"
        folder.mkdir()
        files[arch, qtype] = write_gguf(bases[arch], folder / f"tiny-{qtype.name}.gguf", arch, qtype)
    return files


@pytest.mark.parametrize("arch, qtype", FILES, ids=[f"{a}-{q.name}" for a, q in FILES])
def test_greedy_tokens_equal_transformers_reading_the_same_file(arch, qtype, gguf_files, paged):
    file = gguf_files[arch, qtype]
    reference = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()

    assert ModelConfig.from_pretrained_dir(file).architecture == type(reference).__name__
    # The folder holding the file names it as well as the file itself.
    assert our_greedy(file.parent, paged) == our_greedy(file, paged) == hf_greedy(reference)


def test_tokenizer_and_chat_template_come_from_the_files_metadata(gguf_files):
    file = gguf_files["llama", T.Q8_0]
    base = AutoTokenizer.from_pretrained(file.parents[1] / "llama")
    ours = AutoTokenizer.from_pretrained(**tokenizer_args(file))
    text = "The cat watches a paper boat. Привет, мир!"
    assert ours(text).input_ids == base(text).input_ids
    assert ours.eos_token_id == base.eos_token_id and ours.chat_template == base.chat_template


def test_the_offline_engine_serves_a_gguf_file(gguf_files):
    file = gguf_files["qwen2", T.Q4_0]
    reference = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    prompt = [5, 77, 300, 12, 9]
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)

    (output,) = LLM(str(file), device="cpu", dtype="float32").generate(
        {"prompt_token_ids": prompt}, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))

    assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist()


# Byte offsets of each type's float16 scales in a block: random bytes there may spell inf or NaN.
SCALE_BYTES = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", [*SCALE_BYTES, T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_tensors_decode_exactly_as_the_gguf_package_decodes_them(qtype):
    rng = np.random.default_rng(int(qtype))
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    rows, cols = 6, 1024
    data = rng.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
    for offset in SCALE_BYTES.get(qtype, ()):
        scales = rng.normal(0, 1e-2, size=len(data)).astype(np.float16)
        data[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    if qtype in (T.F16, T.BF16, T.F32):  # finite values only: NaN payloads need not survive
        data = gguf.quants.quantize(rng.normal(size=(rows, cols)).astype(np.float32), qtype).reshape(len(data), -1)

    expected = torch.from_numpy(gguf.quants.dequantize(data.reshape(rows, -1), qtype))
    got = dequantize(torch.from_numpy(data.reshape(-1)), qtype, (rows, cols))

    assert expected.isfinite().all()
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_an_unsupported_type_is_refused_by_name():
    with pytest.raises(ValueError, match="Q2_K is not supported"):
        dequantize(torch.zeros(84, dtype=torch.uint8), T.Q2_K, (1, 256))
