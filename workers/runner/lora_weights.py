"""The LoRA adapters' weights in this process's device slots: every linear layer's slot pool (this
rank's shard of each adapter with tensor parallelism), the step's slot of each token row, and an
LRU of up to `host_lora_capacity` adapters read from their folders and kept in host memory.
Which adapter goes in which slot is decided elsewhere (`LoRASlots`)."""

from collections import OrderedDict

import torch

from kvserve.kernels import get_lora_ops
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.decoder import DecoderForCausalLM
from kvserve.workers.models.lora_adapter import LoRAAdapter, read_adapter
from kvserve.workers.models.lora_layers import attach_lora


class LoRAWeights:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: DecoderForCausalLM,
                 dtype: torch.dtype, device: torch.device):
        self.tokens, self.pools = attach_lora(model, config.max_loras, config.max_lora_rank, get_lora_ops(device),
                                              dtype, device)
        self.model_config = model_config
        self.max_rank = config.max_lora_rank
        self.host_capacity = config.host_lora_capacity
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first

    def load(self, slot: int, name: str, folder: str) -> None:
        """Slot `slot` holds adapter `name` (read from `folder` unless a host copy is kept)."""
        adapter = self._host_adapter(name, folder)
        for module, pool in self.pools.items():
            pool.write(slot, adapter.weights.get(module, {}))
        self.tokens.scalings[slot] = adapter.scaling

    def forget(self, name: str) -> None:
        """Drop the host copy of `name` (removed, or served from another folder from now on)."""
        self.host.pop(name, None)

    def _host_adapter(self, name: str, folder: str) -> LoRAAdapter:
        adapter = self.host.get(name)
        if adapter is None:
            adapter = read_adapter(name, folder, self.model_config, self.max_rank)
            if len(self.host) >= self.host_capacity:
                self.host.popitem(last=False)
            self.host[name] = adapter
        self.host.move_to_end(name)
        return adapter
