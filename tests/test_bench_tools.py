"""The pieces of the benchmark tools that compute numbers we publish."""

import argparse

from kvserve.cluster.bench_serve import make_prompts, oracle_hit_rate, percentiles


def test_oracle_reuses_every_full_block_seen_before():
    first = list(range(32))  # two full blocks of 16
    assert oracle_hit_rate([first, first + [7] * 8], 16) == 32 / 72
    assert oracle_hit_rate([first, first], 16) == 16 / 64  # the last token is always computed


def test_workloads_differ_and_share_what_they_should():
    args = argparse.Namespace(workload="shared-prefix", bench_seed=0, num_requests=20, prompt_len=8,
                              prefix_len=32, groups=2, output_len=4, max_history=200)
    shared = make_prompts(args, 500)
    assert len({tuple(p[:32]) for p in shared}) == 2
    args.workload = "multi-turn"
    turns = make_prompts(args, 500)
    assert all(len(p) <= 200 for p in turns) and oracle_hit_rate(turns, 16) > 0.5
    args.workload = "random"
    assert oracle_hit_rate(make_prompts(args, 500), 16) == 0


def test_percentiles():
    p = percentiles([float(i) for i in range(100)])
    assert (p["p50"], p["p90"], p["p99"]) == (50.0, 90.0, 99.0)
