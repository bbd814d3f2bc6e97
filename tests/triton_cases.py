"""What the Triton kernel tests share. Triton picks compiled or interpreted code when each
@triton.jit function is defined, its own library's included, and conftest has imported triton
already (through transformers). So unless the whole run has TRITON_INTERPRET=1, a module's CPU
cases run in a child pytest started with it (`run_cpu_cases_under_interpreter`), and are
skipped in the parent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

INTERPRETED = triton.knobs.runtime.interpret
ON_CPU = pytest.mark.skipif(not INTERPRETED, reason="run under the interpreter by a child process")
ON_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA"),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def cpu(*values, id):
    return pytest.param(*values, "cpu", id=id, marks=ON_CPU)


def gpu(*values, id):
    return pytest.param(*values, "cuda", id=f"gpu-{id}", marks=ON_GPU)


def run_cpu_cases_under_interpreter(test_file: str) -> None:
    """The CPU cases of `test_file`, in a child pytest with TRITON_INTERPRET=1."""
    child = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-m", "not gpu", "-p", "no:cacheprovider"],
        cwd=Path(__file__).parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stdout[-20000:] + child.stderr[-5000:]
