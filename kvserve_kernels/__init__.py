"""Attention, cache, activation, quantized-matmul and LoRA ops, chosen per device in this one place.

On CUDA the Triton kernels run, elsewhere the plain-PyTorch references. The environment
variable `KVSERVE_KERNELS=triton|torch` overrides the choice (Triton on a CPU needs
`TRITON_INTERPRET=1`, set before triton is first imported).
"""

import importlib
import os
from types import ModuleType

import torch

CHOICES = {"torch": "kvserve.kernels.reference", "triton": "kvserve.kernels.triton_ops"}
QUANT_CHOICES = {"torch": "kvserve.kernels.quant_reference", "triton": "kvserve.kernels.quant_triton"}
LORA_CHOICES = {"torch": "kvserve.kernels.lora_reference", "triton": "kvserve.kernels.lora_triton"}


def get_ops(device: torch.device) -> ModuleType:
    return importlib.import_module(CHOICES[_choice(device)])


def get_quant_ops(device: torch.device) -> ModuleType:
    """The quantized linear layers' ops (`quant_reference.py` or `quant_triton.py`)."""
    return importlib.import_module(QUANT_CHOICES[_choice(device)])


def get_lora_ops(device: torch.device) -> ModuleType:
    """The per-row LoRA deltas (`lora_reference.py` or `lora_triton.py`)."""
    return importlib.import_module(LORA_CHOICES[_choice(device)])


def _choice(device: torch.device) -> str:
    choice = os.environ.get("KVSERVE_KERNELS") or ("triton" if torch.device(device).type == "cuda" else "torch")
    if choice not in CHOICES:
        raise ValueError(f"KVSERVE_KERNELS={choice!r} is not one of {', '.join(CHOICES)}")
    return choice
