"""The cluster simulator (`kvserve bench sim`): its step-time model, its workloads, and that
it runs our real router and engine bookkeeping faithfully enough to compare policies."""

import gc
import json
from collections import Counter, defaultdict

import pytest

from kvserve.cluster.bench.sim.baselines import oracle_hit_rate
from kvserve.cluster.bench.sim.prompts import BlockChains, prompt_tokens
from kvserve.cluster.bench.sim.relay import DelayedFeed, EventStream
from kvserve.cluster.bench.sim.report import summarize
from kvserve.cluster.bench.sim.routers import SIM_POLICIES
from kvserve.cluster.bench.sim.simulator import Cluster, SimConfig, simulate
from kvserve.cluster.bench.sim.step_time import PRESETS, fit_step_time, load_step_fit
from kvserve.cluster.bench.sim.workloads import (
    agentic_tool_loop, llmd_shared_context, mooncake_records, multi_turn_chat, no_reuse, read_mooncake,
    trace_workload, write_mooncake,
)
from kvserve.cluster.cli import main as cli_main
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.workers.engine.block_hash import hash_block_chain
from kvserve.workers.engine.kv_events import BlockSnapshot
from kvserve.workers.engine.outputs import EngineStats
from kvserve.workers.protocol import Heartbeat

H100_8B = PRESETS["h100-llama3-8b-tp1"]
REQUIRED_KEYS = {"policy", "workload", "rate", "replicas", "ingress", "hit_rate", "oracle_hit_rate", "ttft_p50_s",
                 "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "throughput_tok_s", "goodput_req_s", "refused"}


def _shared_context(n=240, rate=6.0, seed=0):
    return llmd_shared_context(n, rate, seed, customers=12, context_tokens=1024, question_tokens=128,
                               output_tokens=16)


def _run(policy, items, **config):
    settings = {"replicas": 4, "kv_blocks": 300, "seed": 0, **config}
    return simulate(policy, items, H100_8B, SimConfig(**settings))


def _hit_rate(policy, items, **config):
    return summarize(_run(policy, items, **config), 2.0, None)["hit_rate"]


# -- step-time model ---------------------------------------------------------------------------


def test_decode_of_an_8b_model_at_batch_1_reads_its_weights_once():
    floor = H100_8B.model.weight_bytes / H100_8B.gpu.bandwidth / H100_8B.mem_efficiency
    step = H100_8B(0, 1, 128) - H100_8B.step_overhead_s
    assert floor == pytest.approx(16.06e9 / 3.35e12 / 0.8)
    assert step == pytest.approx(floor, rel=0.01)


def test_roofline_is_compute_bound_for_long_prefills_and_faster_with_tp():
    prefill = H100_8B(8192, 0, 0) - H100_8B.step_overhead_s
    flops = 2 * H100_8B.model.params * 8192
    assert prefill == pytest.approx(flops / (H100_8B.gpu.flops * H100_8B.compute_efficiency), rel=0.15)
    assert PRESETS["h100-llama3-8b-tp4"](0, 64, 64 * 2048) < H100_8B(0, 64, 64 * 2048)
    # decode at batch 64 costs far less than 64 steps at batch 1
    assert H100_8B(0, 64, 64 * 1024) < 3 * H100_8B(0, 1, 1024)


def test_presets_cover_the_issue_and_leave_sane_kv_pools():
    for name in ("h100-llama3-8b-tp1", "h200-llama3-8b-tp1", "h100-qwen3-32b-tp1", "h200-qwen3-32b-tp4",
                 "h100-llama3-70b-tp4", "h200-llama3-70b-tp8"):
        assert name in PRESETS
    tokens = H100_8B.kv_blocks(16) * 16
    assert 300_000 < tokens < 500_000  # ~52 GB left over 128 KiB per token
    assert "h100-llama3-70b-tp1" not in PRESETS  # 141 GB of weights do not fit in 80 GB


def test_the_fit_recovers_known_coefficients(tmp_path):
    truth = (0.004, 2e-5, 3e-4, 5e-8)
    points = [{"prefill_tokens": p, "decode_seqs": d, "context_tokens": c,
               "step_s": truth[0] + truth[1] * p + truth[2] * d + truth[3] * c}
              for p in (0, 512, 2048) for d in (0, 8, 64) for c in (0, 10_000, 200_000)]
    fit = fit_step_time(points)
    for got, want in zip((fit.base_s, fit.per_prefill_token_s, fit.per_decode_seq_s, fit.per_context_token_s), truth):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"points": points, "num_kv_blocks": 1234}))
    loaded = load_step_fit(path)
    assert loaded.kv_blocks(16) == 1234
    assert loaded(512, 8, 10_000) == pytest.approx(truth[0] + 512 * truth[1] + 8 * truth[2] + 1e4 * truth[3])


# -- workloads -----------------------------------------------------------------------------------


def test_a_mooncake_trace_round_trips(tmp_path):
    records = [
        {"timestamp": 0, "input_length": 1100, "output_length": 20, "hash_ids": [0, 1, 2]},
        {"timestamp": 250, "input_length": 700, "output_length": 5, "hash_ids": [0, 3]},
        {"timestamp": 1000, "input_length": 300, "output_length": 9, "hash_ids": [4]},
    ]
    path = tmp_path / "trace.jsonl"
    write_mooncake(path, records)
    items = read_mooncake(path)
    assert mooncake_records(items) == records
    write_mooncake(tmp_path / "again.jsonl", mooncake_records(items))
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()
    chains = BlockChains(16)
    first, second = (chains.chain(item.segments) for item in items[:2])
    assert first[:32] == second[:32] and first[32] != second[32]  # hash id 0 = 512 tokens = 32 blocks shared
    workload = trace_workload(path)
    assert workload.native_rate == pytest.approx(2.0)
    assert [i.arrival_s for i in workload.at_rate(4.0)] == pytest.approx([0.0, 0.125, 0.5])


def test_block_chains_are_the_engines_block_hashes():
    chains = BlockChains(16)
    for items in (_shared_context(20), multi_turn_chat(30, 2.0, 0), agentic_tool_loop(30, 2.0, 0), no_reuse(5, 1.0, 0)):
        for item in items:
            tokens = prompt_tokens(item.segments)
            assert len(tokens) == item.input_length
            assert chains.chain(item.segments) == hash_block_chain(tokens, 16)


def test_later_turns_resend_the_conversation():
    items = multi_turn_chat(200, 2.0, 0)
    by_prompt = {item.segments: item for item in items}
    second_turns = [item for item in items if len(item.segments) == 4 and item.segments[:2] in by_prompt]
    assert second_turns
    for item in second_turns:
        assert item.segments[2] == (by_prompt[item.segments[:2]].reply, by_prompt[item.segments[:2]].output_length)
    assert oracle_hit_rate(items, BlockChains(16), 16) > 0.5


def _agent_steps(closed_loop: int, n=160, rate=8.0):
    return agentic_tool_loop(n, rate, 0, agents=2, tools_tokens=512, task_tokens=64, tool_output_tokens=64, steps=6,
                             interval_s=0.5, closed_loop=closed_loop)


def _previous_turns(jobs):
    by_reply = {job.item.reply: job for job in jobs}
    return [(job, by_reply[job.item.after]) for job in jobs if job.item.after in by_reply]


def test_open_loop_sessions_send_on_their_own_clock_even_before_the_answer_they_hold():
    items = _agent_steps(closed_loop=0)
    assert all(item.after is None for item in items)
    jobs = _run("kv", items)
    assert all(job.arrival_s == job.item.arrival_s for job in jobs)
    by_reply = {job.item.reply: job for job in jobs}
    answer_of_history = [by_reply.get(job.item.segments[-2][0]) for job in jobs]
    early = [job for job, answer in zip(jobs, answer_of_history) if answer and answer.finish_s > job.arrival_s]
    assert early  # what closed_loop is for: these requests hold answers not written yet


def test_closed_loop_sessions_send_each_turn_its_gap_after_the_answer_it_holds():
    items = _agent_steps(closed_loop=1)
    jobs = _run("kv", items)
    follows = _previous_turns(jobs)
    assert len(follows) > len(jobs) // 2
    for job, previous in follows:
        assert job.item.segments[-2][0] == previous.item.reply
        assert job.arrival_s == pytest.approx(previous.finish_s + job.item.after_s)
        assert job.first_token_s > job.arrival_s
    # a session's first request in the run (its history from before it) goes out as generated
    replies = {job.item.reply for job in jobs}
    assert all(job.arrival_s == job.item.arrival_s for job in jobs if job.item.after not in replies)
    summary = summarize(jobs, 2.0, None)
    assert summary["served"] == len(items)
    assert summary["ttft_p50_s"] < 0.5


def test_closed_loop_turns_after_a_refused_answer_still_go_out():
    items = _agent_steps(closed_loop=1, n=200, rate=200.0)
    jobs = _run("pow2", items, replicas=1, max_ongoing_requests=2, max_queued_requests=4)
    refused = [job for job in jobs if job.refused]
    assert refused and len(jobs) == 200
    assert all(job.refused or job.finish_s is not None for job in jobs)
    followers_of_refused = [job for job, previous in _previous_turns(jobs) if previous.refused]
    assert followers_of_refused


def test_the_relay_beats_for_an_idle_replica_and_is_silent_through_a_step():
    """An idle replica's heartbeat goes out again each heartbeat period, as LLMServer's idle loop
    sends one; a replica in a step sends nothing until the step ends, as the engine's thread."""
    now = 0.0
    follower = KVIndexFollower("sim", 16, clock=lambda: now)
    stats = EngineStats(0, 0, 64, 0, 0, 0, None, None, None, (), (), 0, None, 0)
    stream = EventStream("r", 16, BlockSnapshot(1, 0, []), Heartbeat(1, 0, 0.0, stats))
    feed = DelayedFeed(follower, [stream], delay_s=0.0, routers=1)

    def last_heartbeat_sent_at(t: float) -> float:
        nonlocal now
        now = t
        feed.catch_up(t)
        return follower.latest_heartbeat["r"][0]

    assert last_heartbeat_sent_at(0.3) == 0.3
    stream.stepping(0.4, 1.4)
    assert last_heartbeat_sent_at(1.0) == 0.3
    stream.publish(1.4, None, Heartbeat(1, 0, 1.4, stats))
    assert last_heartbeat_sent_at(1.5) == 1.4
    assert last_heartbeat_sent_at(1.7) == 1.7


def test_the_oracle_counts_each_prompts_longest_prefix_seen_before():
    """The docstring's definition, block by block, against the oracle's bisection."""
    items = agentic_tool_loop(150, 4.0, 0) + multi_turn_chat(150, 4.0, 1)
    items.sort(key=lambda item: item.arrival_s)
    seen, hit, total = set(), 0, 0
    for item in items:
        hashes = hash_block_chain(prompt_tokens(item.segments), 16)
        usable = hashes[: (item.input_length - 1) // 16]
        hit += 16 * next((depth for depth, h in enumerate(usable) if h not in seen), len(usable))
        total += item.input_length
        seen.update(hash_block_chain(prompt_tokens(item.segments + ((item.reply, item.output_length),)), 16))
    assert oracle_hit_rate(items, BlockChains(16), 16) == hit / total


# -- the simulator ---------------------------------------------------------------------------------


def test_a_finished_run_leaves_no_reference_cycle():
    """Reference counting frees the cluster, with the cyclic collector paused as during a run
    (a run's objects are all in the youngest generation)."""
    items = _shared_context(40)
    for policy in SIM_POLICIES:  # first runs import what they use lazily (numpy.ma makes classes: cycles)
        _run(policy, items, ingress=2)
    gc.collect()
    gc.disable()
    try:
        for policy in SIM_POLICIES:
            _run(policy, items, ingress=2)
            assert gc.collect(0) == 0, policy
    finally:
        gc.enable()



def test_a_seed_gives_the_same_run():
    items = _shared_context(120)
    runs = [[(j.replica, j.first_token_s, j.finish_s, j.cached_tokens) for j in _run("kv", items, ingress=2)]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_with_one_replica_and_no_reuse_every_policy_gives_the_same_result():
    items = no_reuse(40, 4.0, 0, input_tokens=400, output_tokens=12)
    results = {p: _without_decision_times(summarize(_run(p, items, replicas=1, route_call_s=0.0), 2.0, None))
               for p in SIM_POLICIES}
    first = results["kv"]
    assert first["served"] == 40 and first["hit_rate"] == 0.0
    for policy, result in results.items():
        assert result == first, policy


def test_a_policy_that_waits_on_remote_calls_delivers_each_request_that_much_later():
    """Ray's tree router asks its tree actor once for the match, and once more for the
    smallest trees where the match is short; the others decide in their own process."""
    items = _shared_context(n=30, rate=0.1)  # one request at a time on one replica

    def ttfts(policy, route_call_s):
        return [job.first_token_s - job.arrival_s for job in _run(policy, items, replicas=1, route_call_s=route_call_s)]

    assert ttfts("kv", 0.004) == ttfts("kv", 0.0)
    added = [round((late - early) / 0.004, 6) for late, early in zip(ttfts("prefix_approx", 0.004),
                                                                    ttfts("prefix_approx", 0.0))]
    assert set(added) == {1.0, 2.0} and added[0] == 2.0  # the first prompt matches nothing


def _without_decision_times(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if not key.startswith("decision_")}


def test_goodput_counts_the_requests_within_the_slo_per_second_of_offered_load():
    items = no_reuse(40, 4.0, 0, input_tokens=400, output_tokens=12)
    jobs = _run("kv", items)
    summary = summarize(jobs, 2.0, None)
    window = items[-1].arrival_s - items[0].arrival_s
    assert summary["slo_attainment"] == 1.0 and summary["goodput_req_s"] == pytest.approx(40 / window)
    jobs[-1].finish_s += 60.0  # a slower drain of the last answer: less throughput, the same goodput
    drained = summarize(jobs, 2.0, None)
    assert drained["goodput_req_s"] == summary["goodput_req_s"]
    assert drained["throughput_tok_s"] < summary["throughput_tok_s"]
    median_ttft = summary["ttft_p50_s"]
    half = summarize(jobs, median_ttft, None)
    assert half["slo_attainment"] == pytest.approx(0.5, abs=0.05)
    assert half["goodput_req_s"] == pytest.approx(half["slo_attainment"] * 40 / window)


def test_kv_finds_at_least_round_robins_hits_and_at_most_the_oracles():
    items = _shared_context()
    kv, round_robin = _hit_rate("kv", items), _hit_rate("round_robin", items)
    oracle = oracle_hit_rate(items, BlockChains(16), 16)
    assert round_robin <= kv <= oracle
    assert kv > round_robin + 0.1  # 12 contexts of 64 blocks, 300 blocks per replica: placement matters


def test_events_later_than_the_run_leave_kv_no_better_than_random():
    items = _shared_context()
    blind = _hit_rate("kv", items, event_delay_s=1e6)
    random_hits = _hit_rate("random", items)
    assert blind <= random_hits + 0.03
    assert _hit_rate("kv", items) > random_hits + 0.1


@pytest.mark.parametrize("max_ongoing_requests", [64, 256])  # Serve's cap stops a pile-up at 64, not at 256
def test_a_prefix_hotter_than_its_holder_can_serve_is_replicated_by_plan(max_ongoing_requests):
    """Two shared contexts, each wanted faster than one replica serves it: `kv` puts each on as
    many replicas as its demand needs (a second holder once the first one's queue costs more
    time than computing the context elsewhere, or once it carries `seconds_max_imbalance`
    more requests than the least busy replica), keeping the time to first token down, where
    the prefix-tree routers pile each on its first holders."""
    items = llmd_shared_context(400, 6.0, 0, customers=2)
    config = SimConfig(replicas=8, seed=0, max_ongoing_requests=max_ongoing_requests)
    step_time = PRESETS["h100-qwen3-32b-tp2"]
    runs = {policy: simulate(policy, items, step_time, config) for policy in ("kv", "prefix_approx", "sglang")}
    holders = defaultdict(Counter)
    for job in runs["kv"]:
        holders[job.item.segments[0][0]][job.replica] += 1
    for context, served in holders.items():
        assert len(served) >= 3, served
        assert max(served.values()) < 0.5 * sum(served.values()), served
    p90 = {policy: summarize(jobs, 2.0, None)["ttft_p90_s"] for policy, jobs in runs.items()}
    assert p90["kv"] < 0.8 * min(p90["prefix_approx"], p90["sglang"]), p90


def test_several_ingress_routers_each_route_their_share():
    jobs = _run("kv", _shared_context(80), ingress=4)
    assert {j.router for j in jobs} == {0, 1, 2, 3}
    assert all(j.finish_s is not None for j in jobs)


def test_overload_queues_then_refuses():
    items = no_reuse(60, 1000.0, 0, input_tokens=400, output_tokens=200)
    jobs = _run("pow2", items, replicas=1, max_ongoing_requests=4, max_queued_requests=10)
    refused = [j for j in jobs if j.refused]
    assert refused and all(j.refused == "queue full" for j in refused)
    assert sum(1 for j in jobs if j.finish_s is not None) == 60 - len(refused)


def test_past_saturation_a_replica_refuses_newcomers_behind_a_long_wait_and_serves_the_rest_in_time():
    items = no_reuse(300, 40.0, 0, input_tokens=400, output_tokens=100)
    runs = {wait: _run("kv", items, replicas=1, max_queue_wait_s=wait) for wait in (None, 0.5)}
    summaries = {wait: summarize(jobs, 2.0, None) for wait, jobs in runs.items()}
    assert summaries[None]["refused"] == 0 and summaries[None]["ttft_p90_s"] > 4.0
    refused = [j for j in runs[0.5] if j.refused]
    assert refused and all("max_queue_wait_s (0.5 s)" in j.refused and j.first_token_s is None for j in refused)
    assert summaries[0.5]["served"] + len(refused) == 300
    assert summaries[0.5]["ttft_p90_s"] < 2.0
    assert summaries[0.5]["goodput_req_s"] > 2 * summaries[None]["goodput_req_s"], summaries


def test_the_router_takes_back_what_a_replica_refused_as_in_serve():
    """Each refused prompt leaves the `kv` router's working set (the replica cached none of
    it); the last prompts served there stay in it."""
    items = no_reuse(300, 40.0, 0, input_tokens=400, output_tokens=100)
    cluster = Cluster("kv", SimConfig(replicas=1, kv_blocks=300, seed=0, max_queue_wait_s=0.5), H100_8B, BlockChains(16))
    jobs = cluster.run(items)
    sets = cluster.routers[0].policy.scorer.working_sets
    sets.sizes(["replica-0"], now=cluster.clock.now)
    refused = [j for j in jobs if j.refused]
    assert refused and all(sets.wanted_among("replica-0", set(j.block_hashes)) == 0 for j in refused)
    last_served = max((j for j in jobs if not j.refused), key=lambda j: j.arrival_s)
    assert sets.wanted_among("replica-0", set(last_served.block_hashes)) == len(last_served.block_hashes)


def test_the_cli_verb_writes_one_record_per_run(tmp_path):
    out = tmp_path / "sim.json"
    code = cli_main(["bench", "sim", "--workload", "llmd", "--requests", "40", "--param", "customers=3",
                     "--param", "context_tokens=600", "--param", "question_tokens=100", "--param", "output_tokens=8",
                     "--replicas", "2", "--ingress", "1,2", "--rates", "2,5", "--policies", "kv,round_robin,dynamo",
                     "--preset", "h100-llama3-8b-tp1", "--kv-blocks", "200", "--kv-option", "max_imbalance=8",
                     "--json", str(out), "--markdown", str(tmp_path / "sim.md")])
    assert code == 0
    records = json.loads(out.read_text())
    assert len(records) == 2 * 2 * 3
    for record in records:
        assert REQUIRED_KEYS <= set(record)
        assert record["kv_options"]["max_imbalance"] == 8
        assert 0 < record["decision_p50_ms"] <= record["decision_p99_ms"]
    assert {(r["rate"], r["ingress"], r["policy"]) for r in records} == {
        (rate, ingress, policy) for rate in (2, 5) for ingress in (1, 2) for policy in ("kv", "round_robin", "dynamo")}
    assert "| rate (req/s) |" in (tmp_path / "sim.md").read_text()
    assert (tmp_path / "sim-llmd-r2-i1.png").stat().st_size > 0


def test_a_warm_up_leaves_the_cold_starts_requests_out_of_every_figure(tmp_path, capsys):
    """30 requests 100 ms apart, each opening with one of 3 shared blocks: after the first
    second, 20 requests, and the oracle finds every shared block cached."""
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, [{"timestamp": 100 * k, "input_length": 600, "output_length": 4, "hash_ids": [k % 3, 10 + k]}
                           for k in range(30)])
    records = {}
    for warmup in ("0", "0.95"):
        out = tmp_path / f"w{warmup}.json"
        assert cli_main(["bench", "sim", "--trace", str(trace), "--policies", "kv", "--replicas", "2",
                         "--preset", "h100-llama3-8b-tp1", "--kv-blocks", "300", "--warmup-s", warmup,
                         "--json", str(out), "--markdown", str(tmp_path / "t.md")]) == 0
        records[warmup] = json.loads(out.read_text())[0]
    cold, warm = records["0"], records["0.95"]
    assert (cold["requests"], warm["requests"]) == (30, 20)
    assert (cold["warmup_s"], warm["warmup_s"]) == (0.0, 0.95)
    assert warm["oracle_hit_rate"] == pytest.approx(512 / 600)
    assert cold["oracle_hit_rate"] == pytest.approx(27 * 512 / (30 * 600))
    assert cli_main(["bench", "sim", "--trace", str(trace), "--warmup-s", "-1"]) == 1
    assert "--warmup-s must be 0 or more" in capsys.readouterr().err
    assert "after the first 0.95 s" in (tmp_path / "t.md").read_text()


def test_the_cli_replays_a_trace_at_its_own_rate(tmp_path):
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, [{"timestamp": 100 * k, "input_length": 600, "output_length": 4, "hash_ids": [k % 3, 10 + k]}
                           for k in range(30)])
    out = tmp_path / "t.json"
    assert cli_main(["bench", "sim", "--trace", str(trace), "--policies", "kv,random", "--replicas", "2",
                     "--preset", "h100-llama3-8b-tp1", "--kv-blocks", "300", "--json", str(out),
                     "--markdown", str(tmp_path / "t.md")]) == 0
    records = json.loads(out.read_text())
    assert [r["rate"] for r in records] == [pytest.approx(10.0)] * 2
    assert records[0]["workload"] == "t" and records[0]["oracle_hit_rate"] > 0.2
