"""Wall time per phase of engine steps, for `kvserve bench overhead`. Engines run without one."""

import time
from collections import defaultdict


class StepClock:
    """Each `lap(phase)` charges the time since the previous lap (or `start`) to `phase`.
    `sync`, if given, is called before the laps named in `synced` so that time queued on an
    accelerator is charged to the phase that queued it."""

    def __init__(self, sync=None, synced: tuple[str, ...] = ("forward", "sampling")):
        self.totals: dict[str, float] = defaultdict(float)
        self._sync = sync
        self._synced = synced
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self._sync is not None and phase in self._synced:
            self._sync()
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now
