"""Prometheus metrics of the front door and the router, one registry per process.

Per-request series carry the labels `model` and `replica`; per-replica gauges carry `replica`
alone, and `kvserve_replica_model` says which model each replica serves. Engine-side gauges (KV usage, running,
waiting) come from the stats each replica publishes through the KV event hub.
"""

from prometheus_client import Counter, Gauge, Histogram

from kvserve.workers.protocol import EngineStats, SpeculativeStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# status: "ok", or the error code (type) of a request refused before it started; its replica then ""
REQUESTS = Counter("kvserve_requests_total", "Requests by outcome", ["model", "replica", "status"])
PROMPT_TOKENS = Counter("kvserve_prompt_tokens_total", "Prompt tokens", ["model", "replica"])
GENERATED_TOKENS = Counter("kvserve_generation_tokens_total", "Generated tokens", ["model", "replica"])
PREFIX_HIT_TOKENS = Counter(
    "kvserve_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache", ["model", "replica"]
)
PREFIX_QUERIED_TOKENS = Counter(
    "kvserve_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache", ["model", "replica"]
)
TTFT = Histogram("kvserve_time_to_first_token_seconds", "Time to first token", ["model", "replica"], buckets=LATENCY_BUCKETS)
ITL = Histogram("kvserve_inter_token_latency_seconds", "Time between streamed tokens", ["model", "replica"], buckets=LATENCY_BUCKETS)
E2E = Histogram("kvserve_e2e_request_latency_seconds", "Request latency", ["model", "replica"], buckets=LATENCY_BUCKETS)
KV_USAGE = Gauge("kvserve_kv_cache_usage_ratio", "Fraction of KV blocks in use", ["replica"])
RUNNING = Gauge("kvserve_num_requests_running", "Sequences running", ["replica"])
WAITING = Gauge("kvserve_num_requests_waiting", "Sequences waiting", ["replica"])
ROUTING_DECISIONS = Counter("kvserve_routing_decisions_total", "Routing decisions", ["policy", "reason"])
ROUTING_TIME = Histogram(
    "kvserve_routing_decision_seconds", "Time of the routing decision itself", ["policy"],
    buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2),
)
REPLICA_MODEL = Gauge("kvserve_replica_model", "1 for each replica, labelled with the model it serves",
                      ["model", "replica"])
INDEX_BLOCKS = Gauge("kvserve_router_index_blocks", "Blocks the router's KV index holds per replica", ["replica"])
UNTRUSTED_REPLICAS = Gauge(
    "kvserve_untrusted_replicas", "Replicas whose block hashing disagrees with the router's"
)
UNKNOWN_DECISIONS = Counter(
    "kvserve_routing_decisions_with_unknown_replicas_total",
    "KV-aware decisions made while a candidate replica's cache was unknown (scored as empty)",
)
REPLICAS_LOST = Counter(
    "kvserve_router_kv_replicas_lost_total",
    "Replicas the router's KV index stopped trusting until a snapshot, by cause", ["cause"],
)
KV_SNAPSHOTS = Counter("kvserve_router_kv_snapshots_total", "Block snapshots loaded into the router's KV index")
KV_FENCED_BATCHES = Counter(
    "kvserve_router_kv_fenced_batches_total", "KV event batches of a stale epoch, refused by the router"
)
KV_EVENT_LAG = Histogram(
    "kvserve_router_kv_event_lag_seconds", "From a KV event batch taken on its replica to the router's index",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def record_decision(policy: str, reason: str, seconds: float) -> None:
    ROUTING_DECISIONS.labels(policy, reason).inc()
    ROUTING_TIME.labels(policy).observe(seconds)


GRAMMAR_COMPILE_TIME = Gauge(
    "kvserve_grammar_compile_seconds_total", "Time spent compiling structured-output grammars", ["replica"])
GRAMMARS_COMPILED = Gauge("kvserve_grammars_compiled_total", "Structured-output grammars compiled", ["replica"])
GRAMMAR_MASK_TIME = Gauge(
    "kvserve_grammar_mask_seconds_total", "Time spent filling structured outputs' token masks", ["replica"])
GRAMMAR_MASKED_STEPS = Gauge("kvserve_grammar_masked_steps_total", "Engine steps with a token mask", ["replica"])
_GRAMMAR_GAUGES = {GRAMMAR_COMPILE_TIME: "compile_s", GRAMMARS_COMPILED: "compiled",
                   GRAMMAR_MASK_TIME: "mask_s", GRAMMAR_MASKED_STEPS: "masked_steps"}

SPEC_PROPOSED = Gauge("kvserve_spec_proposed_tokens_total", "Speculative tokens proposed and verified", ["replica"])
SPEC_ACCEPTED = Gauge("kvserve_spec_accepted_tokens_total", "Speculative tokens the target model kept", ["replica"])
SPEC_MEAN_ACCEPTED = Gauge("kvserve_spec_mean_accepted_length", "Speculative tokens kept per verification",
                           ["replica"])
SPEC_ACCEPTANCE = Gauge("kvserve_spec_acceptance_rate", "Share of proposals kept at each position",
                        ["replica", "position"])
_SPEC_GAUGES = {SPEC_PROPOSED: "proposed", SPEC_ACCEPTED: "accepted", SPEC_MEAN_ACCEPTED: "mean_accepted_length"}

_HOST_TIER_GAUGES = {
    Gauge(f"kvserve_host_kv_{name}", text, ["replica"]): field
    for name, text, field in (
        ("blocks_total", "Blocks of the host-memory KV tier", "blocks_total"),
        ("blocks_cached", "Cached blocks in the host-memory KV tier", "blocks_cached"),
        ("hit_blocks_total", "Prompt blocks found in the host-memory KV tier", "hit_blocks"),
        ("blocks_in_total", "Blocks copied from the host-memory KV tier to the device", "blocks_in"),
        ("blocks_out_total", "Blocks copied from the device to the host-memory KV tier", "blocks_out"),
        ("bytes_in_total", "Bytes copied from the host-memory KV tier to the device", "bytes_in"),
        ("bytes_out_total", "Bytes copied from the device to the host-memory KV tier", "bytes_out"),
    )
}


def _export_speculative(replica: str, stats: SpeculativeStats) -> None:
    for gauge, field in _SPEC_GAUGES.items():
        gauge.labels(replica).set(getattr(stats, field))
    for position, rate in enumerate(stats.acceptance_rate_at):
        SPEC_ACCEPTANCE.labels(replica, str(position)).set(rate)


def export_replica_models(replicas_of: dict[str, list[str]]) -> None:
    """Which model each replica serves (model name -> its replicas), for joining the per-replica
    gauges by model; replicas that are gone lose their series."""
    REPLICA_MODEL.clear()
    for model, replicas in replicas_of.items():
        for replica in replicas:
            REPLICA_MODEL.labels(model, replica).set(1)


def export_replica_stats(stats: dict[str, EngineStats], index_blocks: dict[str, int], untrusted: int) -> None:
    """Refresh the per-replica gauges; replicas that are gone lose their series."""
    for gauge in (KV_USAGE, RUNNING, WAITING, INDEX_BLOCKS, *_GRAMMAR_GAUGES, *_SPEC_GAUGES, SPEC_ACCEPTANCE,
                  *_HOST_TIER_GAUGES):
        gauge.clear()
    for replica, s in stats.items():
        KV_USAGE.labels(replica).set(s.kv_blocks_used / s.kv_blocks_total)
        RUNNING.labels(replica).set(s.running)
        WAITING.labels(replica).set(s.waiting)
        for gauge, field in _GRAMMAR_GAUGES.items() if s.grammars is not None else ():
            gauge.labels(replica).set(getattr(s.grammars, field))
        if s.speculative is not None:
            _export_speculative(replica, s.speculative)
        for gauge, field in _HOST_TIER_GAUGES.items() if s.host_tier is not None else ():
            gauge.labels(replica).set(getattr(s.host_tier, field))
    for replica, blocks in index_blocks.items():
        INDEX_BLOCKS.labels(replica).set(blocks)
    UNTRUSTED_REPLICAS.set(untrusted)
