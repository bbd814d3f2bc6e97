"""The whole engine on its Triton kernels (under the interpreter, on CPU) against the same
engine on the PyTorch references. The interpreter must be on before triton is imported, and
this process imported it long ago, so the Triton side runs in a child process."""

import json
import os
import subprocess
import sys

from kvserve.workers.llm import LLM
from kvserve.workers.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3] * 5, list(range(40, 77)), [300, 301], list(range(100, 150))]
CHILD = """
import json, sys
from kvserve.workers.llm import LLM
from kvserve.workers.sampling_params import SamplingParams
llm = LLM(sys.argv[1], device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=24)
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
print(json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def test_triton_engine_gives_the_reference_tokens(tiny_checkpoints):
    model = str(tiny_checkpoints["qwen3"])
    env = {**os.environ, "TRITON_INTERPRET": "1", "KVSERVE_KERNELS": "triton"}
    child = subprocess.run([sys.executable, "-c", CHILD, model, json.dumps(PROMPTS)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    triton_tokens = json.loads(child.stdout.strip().splitlines()[-1])
    llm = LLM(model, device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=24)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert triton_tokens == [o.outputs[0].token_ids for o in outs]


def test_unknown_kernel_choice_is_refused(monkeypatch):
    import pytest

    from kvserve.kernels import get_ops

    monkeypatch.setenv("KVSERVE_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="KVSERVE_KERNELS"):
        get_ops("cpu")
