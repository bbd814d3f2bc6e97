"""The figures of each replica that every routing decision reads, as rows of two arrays.

A decision looks at every replica. At hundreds of replicas, a dictionary lookup per replica
and figure would cost more than the rest of the decision; instead the follower writes a
replica's row when its news arrives, and a decision finds its replicas' rows once (kept while
it asks about the same replicas and no row moved) and reads every figure with one indexing.
"""

from itertools import repeat

import numpy as np

# The columns of `ReplicaTable.counts`.
REPORTED = 0  # requests running or waiting there, as its last heartbeat counted them
OCCUPIED = 1  # blocks cached (exact, from the index) or in use
USED = 2  # blocks in use
TOTAL = 3  # blocks in its pool
QUEUED_TOKENS = 4  # prompt tokens waiting to be computed
RUNNING = 5  # sequences running
_COLUMNS = 6
_UNHEARD = 0  # the row of every replica without one: all zeros, never known


class ReplicaTable:
    def __init__(self):
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self.counts = np.zeros((2, _COLUMNS), np.int64)
        # Until when its cached blocks count (its last heartbeat's arrival plus the silence
        # after which it is unknown); -inf while the index holds no state of it.
        self.known_until = np.full(2, -np.inf)
        self._asked: list[str] | None = None
        self._asked_rows = np.zeros(0, np.intp)
        self._asked_positions: dict[str, int] = {}

    def write(self, replica: str, counts: tuple[int, ...], known_until: float) -> None:
        row = self._rows.get(replica)
        if row is None:
            row = self._rows[replica] = self._free.pop() if self._free else self._grow()
            self._asked = None
        self.counts[row] = counts
        self.known_until[row] = known_until

    def drop(self, replica: str) -> None:
        row = self._rows.pop(replica, None)
        if row is not None:
            self.counts[row] = 0
            self.known_until[row] = -np.inf
            self._free.append(row)
            self._asked = None

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
            self._asked_rows = np.fromiter(map(self._rows.get, replicas, repeat(_UNHEARD)), np.intp, len(replicas))
            self._asked_positions = {replica: k for k, replica in enumerate(replicas)}
            self._asked = list(replicas)

    def _grow(self) -> int:
        """A new row at the end, doubling the arrays when they are full."""
        row = len(self._rows) + len(self._free) + 1  # the rows handed out so far follow row 0
        if row == len(self.known_until):
            self.counts = np.concatenate((self.counts, np.zeros_like(self.counts)))
            self.known_until = np.concatenate((self.known_until, np.full(row, -np.inf)))
        return row
