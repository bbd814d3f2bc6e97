"""Host-to-device copies that leave the host free to queue more work."""

import torch


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list or a CPU tensor) as a tensor on `device`. On CUDA it is staged in pinned
    memory and copied without blocking: a copy from pageable memory would first wait for all the
    work already queued on the stream, a host-device sync in the middle of a step."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
