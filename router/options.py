"""The routing policies by name, and the KV-aware policy's settings with their defaults: the
one place the config, the CLI, the benchmarks and the router itself take them from."""

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Policy = Literal["kv", "prefix_approx", "pow2", "round_robin"]
POLICIES: tuple[str, ...] = get_args(Policy)


class RouterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cost_unit: Literal["tokens", "seconds"] = Field(
        "seconds", description="kv: `seconds` ranks replicas by predicted time to first token: the tokens queued "
        "there (its heartbeat's, and the uncached tokens of this router's sends it has not counted yet) and the "
        "request's uncached ones, at the speed the replicas measured for their steps (the median of their "
        "reports; a token a second before any has measured), the cost of the blocks it would push out and of "
        "loading its LoRA adapter converted at that speed; the queue being in the cost, only a replica "
        "`seconds_max_imbalance` requests busier than the least busy one is held back. `tokens` (the rule before "
        "`seconds`): tokens to compute + `load_cost_tokens` per request in flight, with the `max_imbalance` / "
        "`imbalance_share` guard")
    cost_jitter: float = Field(
        0.2, ge=0, description="kv, `cost_unit: seconds`: each replica's predicted time is multiplied by 1 + this "
        "x a uniform draw from [0, 1), so that the routers of several ingress replicas, which read the same "
        "reports, spread the same moment's requests over the replicas within that factor of the best instead "
        "of all choosing the same one (0: always the lowest)")
    decode_steps_ahead: int = Field(
        512, ge=0, description="kv, `cost_unit: seconds`: a request that starts a conversation (its prompt holds no "
        "earlier prompt this router sent, and no replica holds more of it than every other holder does) is also "
        "charged, on each replica, the time that replica's running sequences add to this many decode steps: its "
        "later turns will follow it there. Scaled down to nothing where conversations have no later turns (one "
        "request each) or where the replicas' decoding load, averaged over 30 s, is no more uneven than random "
        "placement leaves it (variance at most the mean); 0: place every request for its first token only")
    seed_idle_replicas: bool = Field(
        True, description="kv, `cost_unit: seconds`: where conversations have later turns, a request that starts "
        "one on a shared prefix (a system prompt, a tool context) whose holders all have sequences running goes to a "
        "replica that caches nothing and runs nothing, if there is one. A cost that counts only the request's own "
        "first token never pays a shared prefix's prefill on an empty replica, so a cluster larger than the holders "
        "of its few shared prefixes would leave the others idle for good; the conversation placed there makes it a "
        "holder, and later conversations find an idle holder more often. A prompt no replica holds any of goes to "
        "such a replica too: the jitter of several routers would otherwise put it as often on an idle replica "
        "holding another prefix, which then takes the later requests of both (false: never)")
    waiting_work_charge: float = Field(
        1.0, ge=0, description="kv, `cost_unit: seconds`: while requests wait on the replicas for room, a request's "
        "prefill on a replica (its uncached tokens, the blocks it pushes out) is charged again this many times the "
        "replicas' median count of waiting requests: once most replicas queue, work added anywhere delays about that "
        "many later requests, so a prompt stays where it is cached instead of moving for a slightly shorter queue "
        "and taking the cluster's capacity by its recompute (0: the request's own time to its first token only)")
    min_cached_share: float = Field(
        0.5, ge=0, le=1, description="kv, `cost_unit: seconds`: a prompt of which no replica caches this share is "
        "placed as if no replica cached any of it, by load alone: a conversation's history no cache holds "
        "(replicas restarted under live traffic, or the history evicted) then spreads the prefix it shares with "
        "others (a system prompt, a tool context) over more replicas, which gives the conversations that start on it "
        "later more holders to choose among; what it forgoes is under this share of the prompt's prefill. With one "
        "ingress router only: with 16 the rule cost hit rate and time to first token in the simulator (0: every "
        "cached block counts)")
    load_cost_tokens: int = Field(64, ge=0, description="kv, `cost_unit: tokens`: prompt tokens one in-flight request is worth")
    host_block_credit: float = Field(
        0.8, ge=0, le=1, description="kv: what a block in a replica's host-memory tier saves, against one on its device "
        "(it costs a copy back, not a recompute)")
    lora_load_cost_tokens: int = Field(
        64, ge=0, description="kv: prompt tokens that loading a request's LoRA adapter is worth, on a replica "
        "without it in a device slot (0: ignore where adapters are loaded)")
    max_imbalance: int = Field(16, ge=0, description="kv, `cost_unit: tokens`: most extra in-flight requests over the least busy replica")
    seconds_max_imbalance: int = Field(
        64, ge=0, description="kv, `cost_unit: seconds`: most extra in-flight requests over the least busy replica. "
        "The predicted time is the request's own; it does not count what its decoding adds to every step of the "
        "requests on that replica and of those sent after it, so without a bound a prefix wanted faster than one "
        "replica serves piles onto its holder while others idle, unless Serve's `max_ongoing_requests` stops it")
    imbalance_share: float = Field(
        2.0, ge=0, description="kv: or this share of the least busy replica's in-flight requests, if more")
    working_set_window_s: float = Field(
        60.0, gt=0, description="kv: how long a prompt sent to a replica counts as wanted in its cache (with "
        "several ingress routers, the replica's own count of the last 60 s counts where it is more)")
    recent_s: float = Field(
        5.0, gt=0, description="kv: how long the router's own sends count as cached, until the replica's "
        "KV events have reached the index")
