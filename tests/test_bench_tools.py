"""The pieces of the benchmark tools that compute numbers we publish."""

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from kvserve.cluster import cli
from kvserve.cluster.bench.serve import (
    Result, add_flags, fit_lengths, make_prompts, oracle_hit_rate, percentiles, print_table, send_times, summarize,
)
from kvserve.kernels import reference


def test_oracle_reuses_every_full_block_seen_before():
    first = list(range(32))  # two full blocks of 16
    assert oracle_hit_rate([first, first + [7] * 8], 16) == 32 / 72
    assert oracle_hit_rate([first, first], 16) == 16 / 64  # the last token is always computed


def test_workloads_differ_and_share_what_they_should():
    args = argparse.Namespace(workload="shared-prefix", bench_seed=0, num_requests=20, prompt_len=8,
                              prefix_len=32, groups=2, output_len=4, max_history=200, system_len=0)
    shared = make_prompts(args, 500)
    assert len({tuple(p[:32]) for p in shared}) == 2
    args.workload = "multi-turn"
    turns = make_prompts(args, 500)
    assert all(len(p) <= 200 for p in turns) and oracle_hit_rate(turns, 16) > 0.5
    args.workload = "random"
    assert oracle_hit_rate(make_prompts(args, 500), 16) == 0


@pytest.mark.parametrize("workload", ["shared-prefix", "multi-turn"])
def test_a_system_prompt_opens_every_prompt_and_leaves_the_rest_alone(workload):
    args = argparse.Namespace(workload=workload, bench_seed=0, num_requests=20, prompt_len=8,
                              prefix_len=32, groups=4, output_len=4, max_history=120, system_len=0)
    plain = make_prompts(args, 500)
    args.system_len = 24
    with_system = make_prompts(args, 500)
    system = with_system[0][:24]
    assert all(p[:24] == system for p in with_system)
    if workload == "shared-prefix":
        assert [p[24:] for p in with_system] == plain
    else:  # the system prompt counts towards max_history, so conversations restart sooner
        assert all(len(p) <= 120 for p in with_system) and with_system[0][24:] == plain[0]


@pytest.mark.parametrize("workload", ["random", "shared-prefix", "multi-turn"])
def test_default_lengths_fit_the_served_model(workload):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--url", "http://x", "--workload", workload, "--num-requests", "40"])
    note = fit_lengths(args, 512)
    prompts = make_prompts(args, 500)
    assert all(len(p) + args.output_len <= 512 for p in prompts)
    assert (note is None) == (workload == "random")
    assert fit_lengths(args, 512) is None  # fitted once, they stay


def test_refusals_print_the_servers_reason(capsys):
    args = argparse.Namespace(label="", workload="random", rate=1.0, slo_ttft=1.0, slo_tpot=1.0)
    reason = "400: max_tokens 32 plus the prompt's 512 tokens exceed max_model_len 512"
    results = [Result(ok=False, status=400, refusal=reason)] * 2 + [Result(ok=True, output_tokens=1)]
    summary = summarize(args, results, 1.0, 0.0)
    assert summary["refusals"] == {reason: 2}
    print_table(summary)
    assert f"refused x2: {reason}" in capsys.readouterr().out


def test_bench_routers_runs_the_offload_setups_side_by_side():
    from kvserve.cluster.bench.routers import Setup, add_flags as add_router_flags, setups

    parser = argparse.ArgumentParser()
    add_router_flags(parser)
    assert setups(parser.parse_args([]), "kv") == [Setup(160, 0.0, 0.8)]
    args = parser.parse_args(["--kv-blocks", "48", "--kv-offload-gib", "0", "0.05", "--host-block-credit", "0.8", "0",
                              "--unbounded-kv-blocks", "1024"])
    assert setups(args, "kv") == [Setup(1024, 0.0, 0.8), Setup(48, 0.0, 0.8), Setup(48, 0.05, 0.8),
                                  Setup(48, 0.05, 0.0)]
    assert setups(args, "pow2") == [Setup(1024, 0.0, 0.8), Setup(48, 0.0, 0.8), Setup(48, 0.05, 0.8)]
    args = parser.parse_args(["--cost-unit", "tokens", "seconds"])
    assert setups(args, "kv") == [Setup(160, 0.0, 0.8, cost_unit="tokens"), Setup(160, 0.0, 0.8, cost_unit="seconds")]
    assert setups(args, "pow2") == [Setup(160, 0.0, 0.8)]
    args = parser.parse_args(["--seed-idle-replicas", "on", "off"])
    assert setups(args, "kv") == [Setup(160, 0.0, 0.8), Setup(160, 0.0, 0.8, seed_idle_replicas=False)]
    assert Setup(160, 0.0, 0.8, seed_idle_replicas=False).name == "160 blocks, seed idle replicas off"


def test_bench_routers_lora_workload_gives_each_adapter_its_system_prompt_and_kv_both_costs():
    from kvserve.cluster.bench.routers import Setup, add_flags as add_router_flags, lora_requests, setups

    parser = argparse.ArgumentParser()
    add_router_flags(parser)
    args = parser.parse_args(["--workloads", "lora", "--lora-load-cost-tokens", "0", "256", "--num-requests", "40",
                              "--prefix-len", "20", "--prompt-len", "5"])
    assert setups(args, "kv") == [Setup(160, 0.0, 0.8, 0), Setup(160, 0.0, 0.8, 256)]
    assert setups(args, "pow2") == [Setup(160, 0.0, 0.8)]
    prompts, adapters = lora_requests(args, 500, ["a", "b", "c"])
    systems = {name: {tuple(p[:20]) for p, n in zip(prompts, adapters) if n == name} for name in "abc"}
    assert all(len(s) == 1 for s in systems.values()) and len(set().union(*systems.values())) == 3
    assert {len(p) for p in prompts} == {25}


def _router_bench_args(*argv: str) -> argparse.Namespace:
    from kvserve.cluster.bench.routers import add_flags as add_router_flags

    parser = argparse.ArgumentParser()
    add_router_flags(parser)
    return parser.parse_args(list(argv))


def _shared_blocks(first: list, second: list) -> int:
    return next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


@pytest.mark.parametrize("workload", ["shared-prefix", "multi-turn"])
def test_bench_routers_trace_is_what_the_load_generator_sends(tmp_path, workload):
    from kvserve.cluster.bench.routers import write_trace
    from kvserve.cluster.bench.sim.baselines import oracle_hit_rate as sim_oracle_hit_rate
    from kvserve.cluster.bench.sim.prompts import BlockChains
    from kvserve.cluster.bench.sim.workloads import read_mooncake
    from kvserve.workers.engine.block_hash import hash_block_chain

    # 40-token prefixes and 20-token turns: prompts end in partial blocks of 16
    args = _router_bench_args("--trace-out", str(tmp_path / "trace"), "--num-requests", "40", "--groups", "4",
                              "--prefix-len", "40", "--prompt-len", "20", "--output-len", "8", "--max-history", "200")
    args.workload = workload
    prompts = make_prompts(args, 500)
    items = read_mooncake(write_trace(args, prompts), trace_block_tokens=16)
    assert [item.arrival_s for item in items] == pytest.approx(send_times(args.rate, 40, args.bench_seed), abs=1e-6)
    assert [item.input_length for item in items] == [len(p) for p in prompts]
    assert {item.output_length for item in items} == {8}
    chains = BlockChains(16)
    sim_chains = [chains.chain(item.segments) for item in items]
    real_chains = [hash_block_chain(p, 16) for p in prompts]
    for i in range(len(prompts)):
        for j in range(i):
            assert _shared_blocks(sim_chains[i], sim_chains[j]) == _shared_blocks(real_chains[i], real_chains[j])
    oracle = oracle_hit_rate(prompts, 16)
    assert oracle > 0.3 and sim_oracle_hit_rate(items, chains, 16) == pytest.approx(oracle)


def test_the_load_generator_sends_each_request_at_its_planned_time(monkeypatch):
    from kvserve.cluster.bench import serve as bench_serve

    sent = []

    async def answer(client, url, model, prompt, output_len):
        sent.append(time.perf_counter())
        return Result(ok=True)

    monkeypatch.setattr(bench_serve, "one_request", answer)
    args = argparse.Namespace(url="http://x", rate=100.0, bench_seed=3, output_len=1)
    start = time.perf_counter()
    results, _ = asyncio.run(bench_serve.run_load(args, [[1]] * 20, ["m"] * 20))
    planned = send_times(100.0, 20, 3)
    assert len(results) == 20 and planned[0] == 0.0
    assert all(at - start >= plan - 1e-3 for at, plan in zip(sent, planned))  # never early
    assert sent[-1] - start < planned[-1] + 0.5


def test_bench_engine_step_points_round_trip_through_the_simulators_fit(tmp_path, tiny_checkpoints, capsys):
    from kvserve.cluster.bench.sim.step_time import load_step_fit

    out = tmp_path / "steps.json"
    assert cli.main(["bench", "engine", "--model", str(tiny_checkpoints["llama"]), "--step-points", str(out),
                     "--step-repeats", "1", "--kv-blocks", "32", "--max-model-len", "128"]) == 0
    points = json.loads(out.read_text())["points"]
    steps = {(p["prefill_tokens"], p["decode_seqs"], p["context_tokens"]) for p in points}
    assert (64, 0, 0) in steps  # a 64-token prompt alone
    assert (0, 8, 8 * 16) in steps  # 8 sequences decoding after their 16-token prompts
    assert any(p["prefill_tokens"] and p["decode_seqs"] for p in points)  # a prompt beside decodes
    assert all(p["step_s"] > 0 for p in points)
    fit = load_step_fit(out)
    assert fit.kv_blocks(16) == 32 and fit(64, 0, 0) > 0
    assert "relative error over" in capsys.readouterr().out


def test_percentiles():
    p = percentiles([float(i) for i in range(100)])
    assert (p["p50"], p["p90"], p["p99"]) == (50.0, 90.0, 99.0)


KERNEL_FLAGS = ["--grid", "2x40,3x16", "--prefill-lens", "16,33", "--prefix-len", "20", "--num-heads", "4",
                "--num-kv-heads", "2", "--head-dim", "32", "--copy-mib", "4", "--reps", "2", "--warmup", "1"]


def run_cli(tmp_path, *argv: str) -> dict:
    """Runs `kvserve *argv` in this process; returns the report it wrote with --json."""
    out = tmp_path / "bench.json"
    assert cli.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def table_rows(stdout: str, first_cell: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith(f"| {first_cell}")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_bench_kernels_rows_match_the_shapes(tmp_path, capsys):
    report = run_cli(tmp_path, "bench", "kernels", *KERNEL_FLAGS, "--dtype", "float32")
    stdout = capsys.readouterr().out
    assert report["kernels"] == "kvserve.kernels.reference" and report["copy_gbps"] > 0
    for row, (batch, context) in zip(report["decode"], [(2, 40), (3, 16)], strict=True):
        kv = 2 * batch * context * 2 * 32 * 4  # K and V: 2 KV heads of 32 float32s per token
        q_and_out = 2 * batch * 4 * 32 * 4
        assert row["mbytes"] * 1e6 == pytest.approx(kv + q_and_out)
        assert row["paged_ms"] > 0 and row["sdpa_ms"] > 0
        assert row["gbps"] == pytest.approx(row["mbytes"] / row["paged_ms"])
        assert len(table_rows(stdout, f"{batch}x{context} ")[0]) == 7
    for row, prefix in zip(report["prefill"], [0, 20], strict=True):
        pairs = sum(n * prefix + n * (n + 1) // 2 for n in (16, 33))
        assert row["tflops"] * row["paged_ms"] * 1e9 == pytest.approx(4 * 4 * 32 * pairs)
        assert row["of_sdpa_pct"] == pytest.approx(100 * row["sdpa_ms"] / row["paged_ms"])
    assert len(table_rows(stdout, "16,33 ")) == 2
    assert "paging overhead %, worst case" in stdout


@pytest.mark.parametrize("wrong", ["zeros", "drops-newest-token"])
def test_bench_kernels_refuses_a_wrong_kernel(monkeypatch, capsys, wrong):
    right = reference.paged_attention

    def wrong_kernel(q, k_cache, v_cache, meta, scale):
        if wrong == "zeros":
            return torch.zeros_like(q)
        shorter = dataclasses.replace(meta, context_lens=meta.context_lens - 1,
                                      context_lens_cpu=[n - 1 for n in meta.context_lens_cpu])
        return right(q, k_cache, v_cache, shorter, scale)

    monkeypatch.setattr(reference, "paged_attention", wrong_kernel)
    assert cli.main(["bench", "kernels", *KERNEL_FLAGS]) == 1
    assert "decode 2x40: paged attention and SDPA disagree" in capsys.readouterr().err


def test_bench_kernels_runs_the_triton_kernels_under_the_interpreter():
    child = subprocess.run(
        [sys.executable, "-m", "kvserve.cluster.cli", "bench", "kernels", *KERNEL_FLAGS, "--reps", "1"],
        env={**os.environ, "TRITON_INTERPRET": "1", "KVSERVE_KERNELS": "triton"},
        capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 0, child.stderr[-5000:]
    assert "kernels: kvserve.kernels.triton_ops" in child.stdout
    assert len(table_rows(child.stdout, "2x40 ")) == 1


def test_bench_decode_tiny_model(tmp_path, capsys):
    report = run_cli(tmp_path, "bench", "decode", "--shape", "tiny", "--batches", "1,2", "--context", "8",
                        "--steps", "3", "--dtype", "float32", "--copy-mib", "4", "--reps", "2")
    stdout = capsys.readouterr().out
    hidden, inter, layers, heads, kv_heads, dim, vocab = 64, 128, 2, 4, 2, 16, 512
    layer = 2 * hidden * heads * dim + 2 * hidden * kv_heads * dim + 3 * hidden * inter + 2 * hidden
    weights = 4 * (layers * layer + hidden + vocab * hidden)  # float32, without the input embedding
    kv_per_token = 4 * 2 * layers * kv_heads * dim
    for row, batch in zip(report["decode"], [1, 2], strict=True):
        read = weights + batch * (8 + (3 + 3) / 2) * kv_per_token
        assert row["floor_ms"] * 1e6 * report["copy_gbps"] == pytest.approx(read)
        assert row["step_ms"] > 0 and row["hf_step_ms"] > 0
        assert row["tok_s"] == pytest.approx(batch / row["step_ms"] * 1e3)
        assert row["vs_hf"] == pytest.approx(row["tok_s"] / row["hf_tok_s"])
        assert len(table_rows(stdout, f"dense | {batch} | 8 ")[0]) == 10
    assert "batch-1 step within 1.25x of the floor" in stdout


def test_bench_structured_reports_both_runs_side_by_side(tmp_path, capsys):
    report = run_cli(tmp_path, "bench", "structured", "--batches", "1,2", "--tokens", "8", "--rounds", "1")
    stdout = capsys.readouterr().out
    for row, batch in zip(report["structured"], [1, 2], strict=True):
        assert row["batch"] == batch and row["free_tps"] > 0 and row["guided_tps"] > 0
        assert row["ratio"] == pytest.approx(row["guided_tps"] / row["free_tps"])
        assert row["mask_ms"] > 0
        assert len(table_rows(stdout, f"{batch} ")[0]) == 5


@pytest.mark.parametrize("workload", ["repeating", "random"])
def test_bench_spec_keeps_proposals_only_where_the_text_repeats(tmp_path, workload):
    report = run_cli(tmp_path, "bench", "spec", "--workload", workload, "--batches", "2", "--tokens", "24",
                     "--k", "3", "--rounds", "1")
    (row,) = report["speculative"]
    assert report["workload"] == workload and row["plain_tps"] > 0 and row["spec_tps"] > 0
    if workload == "repeating":
        assert row["acceptance"] > 0.5 and row["passes_per_token"] < 0.8
    else:
        assert row["acceptance"] < 0.2 and row["passes_per_token"] > 0.9


def test_bench_priority_serves_the_important_requests_first_only_under_priority(tmp_path):
    report = run_cli(tmp_path, "bench", "priority", "--requests", "8", "--max-num-seqs", "2", "--tokens", "4")
    ttft = {(row["policy"], row["priority"]): row["ttft_p50_ms"] for row in report["priority"]}
    assert ttft["priority", 0] < ttft["priority", 10]
    assert ttft["fcfs", 10] < ttft["fcfs", 0]  # the unimportant ones were queued first
    assert all(row["requests"] == 4 for row in report["priority"])


def test_bench_route_times_decisions_event_batches_and_hub_answers(capsys):
    from kvserve.cluster.bench import route

    parser = argparse.ArgumentParser()
    route.add_flags(parser)
    args = parser.parse_args(["--replicas", "4", "--prompt-tokens", "256", "--prompts-per-replica", "2",
                              "--decisions", "50", "--churn-batches", "40", "--churn-blocks", "4",
                              "--hub-answers", "4"])
    assert route.main(args) == 0
    decisions, batches, answers = capsys.readouterr().out.strip().splitlines()
    assert decisions.startswith("routing decision, 4 replicas, 256-token prompts (128 blocks indexed): p50 ")
    assert batches.startswith("event batches (4 blocks evicted and 4 stored each, 40 batches): p50 ")
    assert answers.startswith("hub answers (4 replicas, each a heartbeat and a batch of 4 blocks evicted and 4 stored; "
                              "4 answers): a publish p50 ")
    assert "; the follower held the event loop at most at once p50 " in answers and ", in slices p50 " in answers


def test_bench_ingress_prepares_both_ways_and_reports_each(tmp_path, tiny_checkpoints):
    report = run_cli(tmp_path, "bench", "ingress", "--model", str(tiny_checkpoints["llama"]),
                     "--prompt-tokens", "64,4096", "--concurrent", "2", "--rounds", "1")
    rows = report["rows"]
    assert [row["way"] for row in rows] == ["on the loop", "as served"] * 2
    assert all(row["wall_ms"] > 0 and row["held_ms"] >= 0 for row in rows)
    short, long_ = rows[0]["tokens"], rows[2]["tokens"]
    assert abs(short - 64) < 16 and abs(long_ - 4096) < 400
