"""The LoRA Triton kernel against `lora_reference`: under Triton's interpreter on CPU tensors
with small shapes (in a child pytest started with TRITON_INTERPRET=1, as
tests/test_triton_kernels.py explains), and compiled on a GPU at Llama-3-8B sizes."""

import pytest
import torch

from triton_cases import INTERPRETED, TOLERANCE, cpu, gpu, run_cpu_cases_under_interpreter

from kvserve.kernels import get_lora_ops, lora_reference, lora_triton


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_cpu_kernels_under_interpreter():
    run_cpu_cases_under_interpreter(__file__)


def test_cuda_devices_get_the_triton_module():
    assert get_lora_ops(torch.device("cuda")) is lora_triton
    assert get_lora_ops(torch.device("cpu")) is lora_reference


def test_reference_adds_each_rows_own_adapter_and_leaves_base_rows():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 6)
    lora_a, lora_b, scalings = torch.randn(2, 8, 3), torch.randn(2, 3, 6), torch.tensor([0.5, 2.0])
    slots = torch.tensor([1, -1, 0, 1])

    got = lora_reference.add_lora(y.clone(), x, lora_a, lora_b, scalings, slots)

    expected = torch.stack([
        y[t] + (x[t] @ lora_a[s] @ lora_b[s] * scalings[s] if s >= 0 else 0) for t, s in enumerate(slots.tolist())
    ])
    torch.testing.assert_close(got, expected)


ARGS = "tokens, in_features, out_features, rank, num_slots, dtype, device"


@pytest.mark.parametrize(
    ARGS,
    [
        cpu(1, 64, 48, 8, 2, torch.float32, id="decode-one-row"),
        cpu(7, 96, 80, 16, 4, torch.float32, id="mixed-not-pow2"),
        cpu(33, 64, 130, 24, 3, torch.float32, id="prefill-merged-rank"),
        cpu(9, 128, 64, 8, 4, torch.bfloat16, id="bf16"),
        gpu(64, 4096, 6144, 48, 8, torch.bfloat16, id="llama-qkv-batch64"),
        gpu(2048, 14336, 4096, 16, 4, torch.bfloat16, id="llama-down-prefill"),
        gpu(33, 4096, 4096, 16, 4, torch.float32, id="fp32"),
    ],
)
def test_add_lora(tokens, in_features, out_features, rank, num_slots, dtype, device):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, in_features, generator=generator).to(device, dtype)
    y = torch.randn(tokens, out_features, generator=generator).to(device, dtype)
    lora_a = (torch.randn(num_slots, in_features, rank, generator=generator) * 0.05).to(device, dtype)
    lora_b = (torch.randn(num_slots, rank, out_features, generator=generator) * 0.05).to(device, dtype)
    scalings = torch.rand(num_slots, generator=generator).to(device) + 0.5
    slots = torch.randint(-1, num_slots, (tokens,), generator=generator).to(device)

    got = lora_triton.add_lora(y.clone(), x, lora_a, lora_b, scalings, slots)

    expected = lora_reference.add_lora(y.clone(), x, lora_a, lora_b, scalings, slots)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    base_rows = slots < 0
    assert torch.equal(got[base_rows], y[base_rows])
