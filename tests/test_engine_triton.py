"""The whole engine on its Triton kernels (under the interpreter, on CPU) against the same
engine on the PyTorch references. The interpreter must be on before triton is imported, and
this process imported it long ago, so the Triton side runs in a child process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3] * 5, list(range(40, 77)), [300, 301], list(range(100, 150))]
ENGINE = dict(device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=24, num_kv_blocks=64)
CHILD = """
import json, sys
from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams
prompts, options = json.loads(sys.argv[2]), json.loads(sys.argv[3])
outs = LLM(sys.argv[1], **options).generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0))
print(json.dumps([[o.outputs[0].token_ids, [p.logprob for p in o.outputs[0].logprobs]] for o in outs]))
"""


@pytest.mark.parametrize(
    "prompts, options",
    [
        pytest.param(PROMPTS, ENGINE, id="full-precision-cache"),
        pytest.param(PROMPTS[:2], {**ENGINE, "kv_cache_dtype": "fp8_e4m3", "calculate_kv_scales": True},
                     id="fp8-cache"),
    ],
)
def test_triton_engine_gives_the_reference_tokens(tiny_checkpoints, prompts, options):
    model = str(tiny_checkpoints["qwen3"])
    env = {**os.environ, "TRITON_INTERPRET": "1", "KVSERVE_KERNELS": "triton"}
    child = subprocess.run([sys.executable, "-c", CHILD, model, json.dumps(prompts), json.dumps(options)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    triton_outputs = json.loads(child.stdout.strip().splitlines()[-1])
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    outs = LLM(model, **options).generate(prompts, params)
    assert [tokens for tokens, _ in triton_outputs] == [o.outputs[0].token_ids for o in outs]
    torch.testing.assert_close(torch.tensor([logprobs for _, logprobs in triton_outputs]),
                               torch.tensor([[p.logprob for p in o.outputs[0].logprobs] for o in outs]),
                               atol=1e-3, rtol=0)


def test_unknown_kernel_choice_is_refused(monkeypatch):
    from kvserve.kernels import get_ops

    monkeypatch.setenv("KVSERVE_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="KVSERVE_KERNELS"):
        get_ops("cpu")
