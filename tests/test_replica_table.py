"""The per-replica rows a routing decision reads its figures from."""

import random
import statistics

import numpy as np
import pytest

from kvserve.router.replica_table import REPORTED, TOTAL, ReplicaCounter, ReplicaTable, StepCostTable


def test_rows_grow_past_their_arrays_and_keep_every_replica_s_figures():
    table = ReplicaTable()
    names = [f"r{i}" for i in range(40)]  # the arrays start with room for one replica
    for i, name in enumerate(names):
        table.write(name, (i, 0, 0, 10 * i, 0, 0, 0), known_until=float(i))
    figures = table.counts[table.rows(names)]
    assert figures[:, REPORTED].tolist() == list(range(40))
    assert figures[:, TOTAL].tolist() == [10 * i for i in range(40)]
    assert table.known_until[table.rows(names)].tolist() == [float(i) for i in range(40)]


def test_a_replica_never_written_reads_as_zeros_and_never_known():
    table = ReplicaTable()
    table.write("a", (1, 2, 3, 4, 5, 6, 7), known_until=9.0)
    rows = table.rows(["ghost", "a"])
    assert table.counts[rows].tolist() == [[0] * 7, [1, 2, 3, 4, 5, 6, 7]]
    assert table.known_until[rows].tolist() == [-np.inf, 9.0]


def test_a_dropped_replica_s_row_is_zeroed_and_handed_to_the_next_one():
    table = ReplicaTable()
    table.write("a", (1,) * 7, known_until=5.0)
    table.write("b", (2,) * 7, known_until=5.0)
    asked = ["a", "b"]
    row_a = int(table.rows(asked)[0])
    table.drop("a")
    assert table.counts[table.rows(asked)].tolist() == [[0] * 7, [2] * 7]  # the asked rows were worked out again
    assert table.known_until[table.rows(asked)].tolist() == [-np.inf, 5.0]
    table.write("c", (3,) * 7, known_until=7.0)
    assert int(table.rows(["c"])[0]) == row_a
    assert table.counts[table.rows(["a", "b", "c"])][:, REPORTED].tolist() == [0, 2, 3]


def test_positions_follow_the_list_asked():
    table = ReplicaTable()
    assert table.positions(["x", "y"]) == {"x": 0, "y": 1}
    assert table.positions(["y", "x", "z"]) == {"y": 0, "x": 1, "z": 2}


def test_a_counter_counts_from_zero_and_reads_as_an_array():
    counter = ReplicaCounter()
    assert counter["a"] == 0
    for _ in range(3):
        counter["a"] += 1
    counter.update({f"r{i}": i for i in range(10)})  # past the arrays' first size
    assert counter["a"] == 3
    assert counter.of(["r9", "a", "never", "r1"]).tolist() == [9, 3, 0, 1]
    counter.drop("a")
    assert counter["a"] == 0
    assert counter.of(["a", "r9"]).tolist() == [0, 9]


def test_the_step_cost_median_follows_every_write_and_drop():
    """Against the median of the replicas' current tuples, through writes that change a fit,
    writes that repeat one, new replicas and dropped ones, and fits with the same values."""
    rng = random.Random(3)
    table, current = StepCostTable(), {}
    assert table.median() is None
    for _ in range(300):
        replica = f"r{rng.randrange(12)}"
        if rng.random() < 0.2:
            table.drop(replica)
            current.pop(replica, None)
        elif rng.random() < 0.3 and replica in current:
            table.write(replica, current[replica])
        else:
            current[replica] = (rng.choice([0.01, rng.random()]), rng.random() / 1e4, rng.random() / 1e3,
                                rng.choice([512, 2048, 8192]))
            table.write(replica, current[replica])
        expected = tuple(statistics.median(c) for c in zip(*current.values())) if current else None
        assert table.median() == expected


def test_the_step_cost_median_is_worked_out_again_only_after_a_change():
    table = StepCostTable()
    table.write("a", (0.01, 1e-5, 1e-4, 2048))
    table.write("b", (0.03, 3e-5, 3e-4, 2048))
    median = table.median()
    assert median == pytest.approx((0.02, 2e-5, 2e-4, 2048.0))
    table.write("a", (0.01, 1e-5, 1e-4, 2048))  # the same fit again
    assert table.median() is median
    table.write("c", (0.05, 5e-5, 5e-4, 2048))
    assert table.median() == pytest.approx((0.03, 3e-5, 3e-4, 2048.0))


def test_a_step_cost_that_is_not_a_finite_number_counts_as_none():
    table = StepCostTable()
    table.write("a", (0.01, 1e-5, 1e-4, 2048))
    table.write("b", (float("nan"), 3e-5, 3e-4, 2048))
    assert table.median() == (0.01, 1e-5, 1e-4, 2048.0)
    table.write("a", (0.01, float("inf"), 1e-4, 2048))  # its earlier fit goes too
    assert table.median() is None
