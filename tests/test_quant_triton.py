"""The quantized-matmul Triton kernels against `quant_reference`: under Triton's interpreter on
CPU tensors with small shapes (in a child pytest started with TRITON_INTERPRET=1, as
tests/test_triton_kernels.py explains), and compiled on a GPU at Llama-3-8B sizes."""


import pytest
import torch

from triton_cases import INTERPRETED, TOLERANCE, cpu, gpu, run_cpu_cases_under_interpreter

from kvserve.kernels import get_quant_ops, quant_reference, quant_triton


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_cpu_kernels_under_interpreter():
    run_cpu_cases_under_interpreter(__file__)


def test_cuda_devices_get_the_triton_module():
    assert get_quant_ops(torch.device("cuda")) is quant_triton
    assert get_quant_ops(torch.device("cpu")) is quant_reference


def assert_matches(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tolerance = TOLERANCE[got.dtype]
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def int_weights(out_features, in_features, bits, group_size, act_order, device):
    """Random codes, scales and zero points in the packed layout; with `act_order`, each input's
    group from a random permutation (GPTQ's g_idx)."""
    groups = in_features // group_size
    codes = torch.randint(0, 2**bits, (out_features, in_features), dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (out_features, groups), dtype=torch.uint8)
    scales = torch.rand(out_features, groups) * 0.02 / 2**bits + 1e-4
    g_idx = (torch.randperm(in_features) // group_size).to(torch.int32) if act_order else None
    qweight = quant_reference.pack_codes(codes, bits)
    return [t if t is None else t.to(device) for t in (qweight, scales, zeros, g_idx)]


INT_ARGS = "tokens, out_features, in_features, bits, group_size, act_order, dtype, device"


@pytest.mark.parametrize(
    INT_ARGS,
    [
        cpu(3, 48, 256, 4, 128, False, torch.float32, id="decode-int4-g128"),
        cpu(70, 40, 128, 4, 32, False, torch.float32, id="prefill-int4-g32"),
        cpu(5, 32, 96, 8, 96, False, torch.float32, id="decode-int8-channel-not-pow2"),
        cpu(20, 32, 128, 4, 32, True, torch.float32, id="prefill-int4-act-order"),
        cpu(1, 64, 256, 4, 64, True, torch.bfloat16, id="decode-int4-act-order-bf16"),
        cpu(17, 48, 128, 8, 128, False, torch.bfloat16, id="prefill-int8-bf16"),
        gpu(1, 4096, 4096, 4, 128, False, torch.bfloat16, id="llama-o-int4-batch1"),
        gpu(64, 28672, 4096, 4, 128, False, torch.bfloat16, id="llama-gate-up-int4-batch64"),
        gpu(1000, 4096, 14336, 4, 128, False, torch.bfloat16, id="llama-down-int4-prefill"),
        gpu(16, 6144, 4096, 8, 4096, False, torch.bfloat16, id="llama-qkv-int8-channel"),
        gpu(300, 4096, 4096, 4, 128, True, torch.bfloat16, id="llama-int4-act-order"),
        gpu(33, 1024, 4096, 4, 128, False, torch.float32, id="fp32"),
    ],
)
def test_int_linear(tokens, out_features, in_features, bits, group_size, act_order, dtype, device):
    torch.manual_seed(0)
    qweight, scales, zeros, g_idx = int_weights(out_features, in_features, bits, group_size, act_order, device)
    x = torch.randn(tokens, in_features, dtype=dtype, device=device)

    got = quant_triton.int_linear(x, qweight, scales, zeros, g_idx, bits, group_size)

    assert_matches(got, quant_reference.int_linear(x, qweight, scales, zeros, g_idx, bits, group_size))


def fp8_weights(out_features, in_features, device):
    weight = torch.randn(out_features, in_features).mul_(64).clamp_(-448, 448).to(torch.float8_e4m3fn)
    weight_scale = torch.rand(out_features) * 0.01 / 64 + 1e-5
    return weight.to(device), weight_scale.to(device)


FP8_ARGS = "tokens, out_features, in_features, activations, dtype, device"


@pytest.mark.parametrize(
    FP8_ARGS,
    [
        cpu(3, 48, 64, None, torch.float32, id="decode-weight-only"),
        cpu(70, 40, 96, "dynamic", torch.float32, id="prefill-dynamic"),
        cpu(5, 32, 128, "static", torch.bfloat16, id="decode-static-bf16"),
        cpu(20, 48, 64, "dynamic", torch.bfloat16, id="prefill-dynamic-bf16"),
        gpu(1, 4096, 4096, "dynamic", torch.bfloat16, id="llama-dynamic-batch1"),
        gpu(64, 28672, 4096, "dynamic", torch.bfloat16, id="llama-dynamic-batch64"),
        gpu(1000, 4096, 14336, "static", torch.bfloat16, id="llama-static-prefill"),
        gpu(16, 6144, 4096, None, torch.bfloat16, id="llama-weight-only"),
        gpu(33, 1000, 4096, "dynamic", torch.bfloat16, id="not-a-multiple-of-16"),
        gpu(33, 1024, 4096, "dynamic", torch.float32, id="fp32"),
    ],
)
def test_fp8_linear(tokens, out_features, in_features, activations, dtype, device):
    torch.manual_seed(0)
    weight, weight_scale = fp8_weights(out_features, in_features, device)
    input_scale = torch.tensor([0.02], device=device) if activations == "static" else None
    x = torch.randn(tokens, in_features, dtype=dtype, device=device)

    got = quant_triton.fp8_linear(x, weight, weight_scale, input_scale, activations is not None)

    expected = quant_reference.fp8_linear(x, weight, weight_scale, input_scale, activations is not None)
    assert_matches(got, expected)


@pytest.mark.skipif(INTERPRETED, reason="no Triton kernel in it")
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_fp8_linear_through_scaled_mm_takes_its_scales_right(activations, monkeypatch):
    """The `torch._scaled_mm` call, run by torch's CPU implementation."""
    monkeypatch.setattr(quant_triton, "has_scaled_mm", lambda x, weight: True)
    torch.manual_seed(0)
    weight, weight_scale = fp8_weights(48, 64, "cpu")
    input_scale = torch.tensor([0.02]) if activations == "static" else None
    x = torch.randn(5, 64, dtype=torch.bfloat16)

    got = quant_triton.fp8_linear(x, weight, weight_scale, input_scale, True)

    assert_matches(got, quant_reference.fp8_linear(x, weight, weight_scale, input_scale, True))
