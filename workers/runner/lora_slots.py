"""Which LoRA adapter each device slot holds: `max_loras` slots, the least recently used one
taken for an adapter a step needs. Adapters come from `lora_modules` at startup or are added and
removed at run time (`add`, `remove`).

One process decides: the engine's. In it `ModelRunner` writes each slot load into its own
`LoRAWeights`; `TPExecutor` sends a step's slot loads and the slot of each of its tokens to every
rank with the step, and each rank writes its shard of the adapters into its slots. So every rank
holds the same adapter in the same slot, and the engine knows which adapters are resident
without asking the ranks."""

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.lora_adapter import check_adapter
from kvserve.workers.runner.transfer import to_device

BASE_SLOT = -1
SlotLoad = tuple[int, str, str]  # (slot, adapter name, its folder): the slot takes that adapter before the step


class LoRASlots:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        for name, folder in config.lora_modules.items():  # every problem before the engine starts
            check_adapter(name, folder, model_config, config.max_lora_rank)
        self.folders = dict(config.lora_modules)
        self.model_config = model_config
        self.max_rank = config.max_lora_rank
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.free_slots = list(range(config.max_loras - 1, -1, -1))
        self.num_slot_loads = 0

    def add(self, name: str, folder: str) -> None:
        """Serve `name` from `folder`, checked as at startup (ValueError); a new folder for a name
        already served replaces its weights. The caller forgets any host copy of the old ones."""
        check_adapter(name, folder, self.model_config, self.max_rank)
        self.remove(name)
        self.folders[name] = folder

    def remove(self, name: str) -> None:
        """Forget `name`: its folder and its slot. The caller makes sure no request still runs
        under it."""
        self.folders.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.free_slots.append(slot)

    def resident(self) -> tuple[str, ...]:
        """The adapters in slots now, least recently used first."""
        return tuple(self.slot_of)

    def assign(self, names: list[str | None], load: Callable[[int, str, str], None]) -> list[int]:
        """The slot of each adapter name (None: the base model, BASE_SLOT). An adapter not yet in a
        slot gets one, and `load(slot, name, folder)` is called before the slot counts as its."""
        # In order of first use, not a set's order: the same evictions in every run.
        needed = list(dict.fromkeys(name for name in names if name is not None))
        for name in needed:
            self._make_resident(name, needed, load)
        return [BASE_SLOT if name is None else self.slot_of[name] for name in names]

    def _make_resident(self, name: str, needed: list[str], load: Callable[[int, str, str], None]) -> None:
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            return
        slot = self.free_slots.pop() if self.free_slots else self._evict(needed)
        try:
            load(slot, name, self.folders[name])
        except BaseException:
            self.free_slots.append(slot)  # whatever it held before is gone
            raise
        self.slot_of[name] = slot
        self.num_slot_loads += 1

    def _evict(self, needed: list[str]) -> int:
        """The slot of the least recently used adapter this step does not need."""
        victim = next((name for name in self.slot_of if name not in needed), None)
        if victim is None:
            raise RuntimeError(f"a step needs {len(needed)} LoRA adapters but there are only "
                               f"{len(self.slot_of)} slots (max_loras)")
        return self.slot_of.pop(victim)


def token_slots(slots: list[int], num_new_tokens: list[int], device: torch.device) -> torch.Tensor:
    """The slot of each token of a step whose sequences, in slots `slots`, compute `num_new_tokens` each."""
    return to_device(np.repeat(slots, num_new_tokens), torch.long, device)
