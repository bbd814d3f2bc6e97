"""The tensor-parallel group of one engine: its collectives, and how a rank joins it."""

import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A peer that stops answering fails the collective after this long instead of hanging it;
# the engine usually notices a dead rank through Ray much sooner.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class TPGroup:
    """This process's rank among `size` ranks; with size 1 every collective is a no-op."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, op=op)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim`, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)


SINGLE = TPGroup()


# Above Ray's default worker ports (10002-19999), below the kernel's ephemeral range (where it
# picks outgoing connections' source ports, 32768 and up on Linux).
LISTEN_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port free on this machine now, on every interface. Not one the kernel would pick
    itself: that range also gives outgoing connections their source ports, and a busy process
    (Ray opens many) may take the port before the caller binds it."""
    ephemeral = _ephemeral_ports()
    candidates = [p for p in random.sample(LISTEN_PORTS, 64) if p not in ephemeral]
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _ephemeral_ports() -> range:
    """The ports the kernel hands out as source ports (Linux; elsewhere its usual range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 65536)


def join_group(rank: int, size: int, master_addr: str, master_port: int, device: torch.device) -> TPGroup:
    """Make this process `rank` of the default process group (NCCL on CUDA, gloo elsewhere)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return TPGroup(rank, size)
