"""The host-memory KV tier: blocks copied out of the device's cache and back, exactly.

One host block holds every layer's K and V of one device block, contiguous, so that each block
crosses the bus in one copy. On CUDA the host memory is pinned and the copies are queued on
the current stream without the host waiting for them; a copy back waits only for copies out
still under way, since it reads the host memory they write.
"""

import torch

from kvserve.workers.engine.kv_cache_manager import BlockTransfer


def host_blocks_for(gib: float, block_bytes: int) -> int:
    return int(gib * 2**30) // block_bytes


class HostKVTier:
    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_blocks: int):
        self.kv_caches = kv_caches
        k_cache = kv_caches[0][0]
        self.device = k_cache.device
        shape = (num_blocks, len(kv_caches), 2, *k_cache.shape[1:])
        self.blocks = torch.empty(shape, dtype=k_cache.dtype, pin_memory=self.device.type == "cuda")
        self._copied_out: torch.cuda.Event | None = None
        self.bytes_out = 0
        self.bytes_in = 0

    @torch.inference_mode()
    def apply(self, transfers: list[BlockTransfer]) -> None:
        """Run the transfers in order, each run of one direction as one gather."""
        start = 0
        for end in range(1, len(transfers) + 1):
            if end == len(transfers) or transfers[end].to_host != transfers[start].to_host:
                run = transfers[start:end]
                self._copy_out(run) if run[0].to_host else self._copy_in(run)
                start = end

    def _copy_out(self, run: list[BlockTransfer]) -> None:
        src = torch.tensor([t.src for t in run], device=self.device)
        staged = torch.stack([torch.stack((k[src], v[src]), dim=1) for k, v in self.kv_caches], dim=1)
        for row, transfer in enumerate(run):
            self.blocks[transfer.dst].copy_(staged[row], non_blocking=True)
        self.bytes_out += staged.nbytes
        if self.device.type == "cuda":
            self._copied_out = torch.cuda.Event()
            self._copied_out.record()

    def _copy_in(self, run: list[BlockTransfer]) -> None:
        if self._copied_out is not None:
            self._copied_out.synchronize()
            self._copied_out = None
        loaded = self.blocks[[t.src for t in run]].to(self.device)
        dst = torch.tensor([t.dst for t in run], device=self.device)
        for layer, (k, v) in enumerate(self.kv_caches):
            k[dst] = loaded[:, layer, 0]
            v[dst] = loaded[:, layer, 1]
        self.bytes_in += loaded.nbytes
