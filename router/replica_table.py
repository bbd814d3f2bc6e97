"""Per-replica figures that every routing decision reads, as rows of arrays.

A decision looks at every replica. At hundreds of replicas, a dictionary lookup per replica
and figure would cost more than the rest of the decision; instead each figure is written to
the replica's row when it changes, and a decision finds its replicas' rows once (kept while
it asks about the same replicas and no row moved) and reads every figure with one indexing.
The replicas' step costs are read only as their median, kept up to date as fits change
(`StepCostTable`).
"""

import bisect
import math
from itertools import repeat

import numpy as np

# The columns of `ReplicaTable.counts`, the follower's figures from the replicas' news.
REPORTED = 0  # requests running or waiting there, as its last heartbeat counted them
OCCUPIED = 1  # blocks cached (exact, from the index) or in use
USED = 2  # blocks in use
TOTAL = 3  # blocks in its pool
QUEUED_TOKENS = 4  # prompt tokens waiting to be computed
RUNNING = 5  # sequences running
WORKING_SET = 6  # distinct prompt blocks its requests asked for lately (`workers/engine/working_set.py`)
_COLUMNS = 7
_UNWRITTEN = 0  # the row of every replica without one: all zeros


class ReplicaRows:
    """A row of `columns` counts per replica written so far; the rows of replicas dropped are
    handed out again."""

    def __init__(self, columns: int, dtype: type = np.int64):
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self.counts = np.zeros((2, columns), dtype)
        self._asked: list[str] | None = None
        self._asked_rows = np.zeros(0, np.intp)
        self._asked_positions: dict[str, int] = {}

    def row(self, replica: str) -> int:
        """The row of `replica`, a new one if it had none."""
        row = self._rows.get(replica)
        if row is None:
            row = self._rows[replica] = self._free.pop() if self._free else self._grow()
            self._asked = None
        return row

    def drop(self, replica: str) -> int | None:
        """Zero the row of `replica` and hand it back; the row it had, if any."""
        row = self._rows.pop(replica, None)
        if row is not None:
            self.counts[row] = 0
            self._free.append(row)
            self._asked = None
        return row

    def rows(self, replicas: list[str]) -> np.ndarray:
        """The rows of `replicas`, in their order (a replica never written: the zero row)."""
        self._ask(replicas)
        return self._asked_rows

    def positions(self, replicas: list[str]) -> dict[str, int]:
        """Each of `replicas` to its index in the list (read it, never change it)."""
        self._ask(replicas)
        return self._asked_positions

    def _ask(self, replicas: list[str]) -> None:
        if replicas != self._asked:
            self._asked_rows = np.fromiter(map(self._rows.get, replicas, repeat(_UNWRITTEN)), np.intp, len(replicas))
            self._asked_positions = {replica: k for k, replica in enumerate(replicas)}
            self._asked = list(replicas)

    def _grow(self) -> int:
        """A new row at the end, doubling the arrays when they are full."""
        row = len(self._rows) + len(self._free) + 1  # the rows handed out so far follow row 0
        if row == len(self.counts):
            self._double()
        return row

    def _double(self) -> None:
        self.counts = np.concatenate((self.counts, np.zeros_like(self.counts)))


class ReplicaTable(ReplicaRows):
    """The follower's figures of each replica (the columns above), and until when they count."""

    def __init__(self):
        super().__init__(_COLUMNS)
        # Until when its cached blocks count (its last heartbeat's arrival plus the silence
        # after which it is unknown); -inf while the index holds no state of it.
        self.known_until = np.full(len(self.counts), -np.inf)

    def write(self, replica: str, counts: tuple[int, ...], known_until: float) -> None:
        row = self.row(replica)
        self.counts[row] = counts
        self.known_until[row] = known_until

    def drop(self, replica: str) -> int | None:
        row = super().drop(replica)
        if row is not None:
            self.known_until[row] = -np.inf
        return row

    def _double(self) -> None:
        super()._double()
        self.known_until = np.concatenate((self.known_until, np.full(len(self.known_until), -np.inf)))


class ReplicaCounter(ReplicaRows):
    """One count per replica, 0 until set, read for a list of replicas as an array."""

    def __init__(self):
        super().__init__(1)

    def __getitem__(self, replica: str) -> int:
        row = self._rows.get(replica)
        return 0 if row is None else int(self.counts[row, 0])

    def __setitem__(self, replica: str, count: int) -> None:
        row = self.row(replica)  # first: a new row may replace `counts`
        self.counts[row, 0] = count

    def update(self, counts: dict[str, int]) -> None:
        for replica, count in counts.items():
            self[replica] = count

    def of(self, replicas: list[str]) -> np.ndarray:
        return self.counts[self.rows(replicas), 0]


class StepCostTable:
    """Each replica's step cost, once its heartbeat has one (base_s, per_prefill_token_s,
    per_decode_seq_s, tokens_per_step), and their median. Each coefficient's values are kept
    sorted, so that a changed fit moves one value per coefficient (two bisections) and the
    median is read off the middle: at hundreds of replicas heartbeats change some fit between
    most decisions, and sorting every fit again for the next decision cost tens of
    microseconds of it. A fit with a coefficient that is not a finite number counts as none."""

    def __init__(self):
        self._fits: dict[str, tuple[float, ...]] = {}
        self._sorted: tuple[list[float], ...] = ([], [], [], [])
        self._median: tuple[float, float, float, float] | None = None

    def write(self, replica: str, coefficients: tuple[float, float, float, int]) -> None:
        fit = tuple(map(float, coefficients))
        if not all(map(math.isfinite, fit)):
            self.drop(replica)
            return
        old = self._fits.get(replica)
        if old == fit:
            return
        if old is not None:
            self._remove(old)
        self._fits[replica] = fit
        for values, value in zip(self._sorted, fit):
            bisect.insort(values, value)
        self._median = None

    def drop(self, replica: str) -> None:
        old = self._fits.pop(replica, None)
        if old is not None:
            self._remove(old)
            self._median = None

    def _remove(self, fit: tuple[float, ...]) -> None:
        for values, value in zip(self._sorted, fit):
            del values[bisect.bisect_left(values, value)]

    def median(self) -> tuple[float, float, float, float] | None:
        """Of each coefficient over the replicas that have one; None if none has."""
        if self._median is None and self._fits:
            n, middle = len(self._fits), len(self._fits) // 2
            self._median = tuple(v[middle] if n % 2 else (v[middle - 1] + v[middle]) / 2 for v in self._sorted)
        return self._median
