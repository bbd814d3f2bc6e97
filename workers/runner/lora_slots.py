"""Which LoRA adapter each device slot holds: `max_loras` slots, the least recently used one
taken for an adapter a step needs; behind them, up to `host_lora_capacity` adapters read from
their folders and kept in host memory, least recently used dropped first. Adapters come from
`lora_modules` at startup or are added and removed at run time (`add`, `remove`)."""

from collections import OrderedDict

import numpy as np
import torch

from kvserve.kernels import get_lora_ops
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.sequence import Sequence
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.decoder import DecoderForCausalLM
from kvserve.workers.models.lora_adapter import LoRAAdapter, check_adapter, read_adapter
from kvserve.workers.models.lora_layers import attach_lora
from kvserve.workers.runner.transfer import to_device

BASE_SLOT = -1


class LoRASlots:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: DecoderForCausalLM,
                 dtype: torch.dtype, device: torch.device):
        for name, folder in config.lora_modules.items():  # every problem before the engine starts
            check_adapter(name, folder, model_config, config.max_lora_rank)
        self.tokens, self.pools = attach_lora(model, config.max_loras, config.max_lora_rank, get_lora_ops(device),
                                              dtype, device)
        self.folders = dict(config.lora_modules)
        self.model_config = model_config
        self.max_rank = config.max_lora_rank
        self.host_capacity = config.host_lora_capacity
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.free_slots = list(range(config.max_loras - 1, -1, -1))
        self.num_slot_loads = 0
        self.device = device

    def add(self, name: str, folder: str) -> None:
        """Serve `name` from `folder`, checked as at startup (ValueError); a new folder for a name
        already served replaces its weights."""
        check_adapter(name, folder, self.model_config, self.max_rank)
        self.remove(name)
        self.folders[name] = folder

    def remove(self, name: str) -> None:
        """Forget `name`: its folder, its host copy and its slot. The caller makes sure no
        request still runs under it."""
        self.folders.pop(name, None)
        self.host.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.free_slots.append(slot)

    def token_slots(self, seqs: list[Sequence], num_new_tokens: list[int]) -> torch.Tensor:
        """The slot of each token of a step whose sequences `seqs` compute `num_new_tokens` each,
        on the device; their adapters resident once this returns."""
        slots = self.slots_for([seq.lora_name for seq in seqs])
        return to_device(np.repeat(slots, num_new_tokens), torch.long, self.device)

    def slots_for(self, names: list[str | None]) -> list[int]:
        """The slot of each adapter name (None: the base model, BASE_SLOT), every one of them
        resident on the device once this returns."""
        needed = set(names) - {None}
        for name in needed:
            self._make_resident(name, needed)
        return [BASE_SLOT if name is None else self.slot_of[name] for name in names]

    def _make_resident(self, name: str, needed: set[str]) -> None:
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            return
        slot = self.free_slots.pop() if self.free_slots else self._evict(needed)
        adapter = self._host_adapter(name)
        for module, pool in self.pools.items():
            pool.write(slot, adapter.weights.get(module, {}))
        self.tokens.scalings[slot] = adapter.scaling
        self.slot_of[name] = slot
        self.num_slot_loads += 1

    def _evict(self, needed: set[str]) -> int:
        """The slot of the least recently used adapter this step does not need."""
        victim = next((name for name in self.slot_of if name not in needed), None)
        if victim is None:
            raise RuntimeError(f"a step needs {len(needed)} LoRA adapters but there are only "
                               f"{len(self.slot_of)} slots (max_loras)")
        return self.slot_of.pop(victim)

    def _host_adapter(self, name: str) -> LoRAAdapter:
        adapter = self.host.get(name)
        if adapter is None:
            adapter = read_adapter(name, self.folders[name], self.model_config, self.max_rank)
            if len(self.host) >= self.host_capacity:
                self.host.popitem(last=False)
            self.host[name] = adapter
        self.host.move_to_end(name)
        return adapter
