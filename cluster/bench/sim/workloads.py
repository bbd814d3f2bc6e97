"""The requests a simulation replays: a Mooncake-format trace, or one of the generators.

Each request is a `WorkItem`: when it arrives, its prompt as segments (see prompts.py), how
many tokens it generates, and the segment id of its answer, which the simulated replica
emits token by token, so that a later turn that quotes the answer can hit its blocks in the
cache. A workload is built for a target request rate; sweeping rates rebuilds it (generators)
or compresses the trace's clock (traces), keeping the order of requests.
"""

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvserve.cluster.bench.sim.prompts import Segment
from kvserve.workers.engine.block_hash import hash_block_chain

# Segment id ranges, so that ids of different kinds never meet. Trace hash ids are their own.
_CONTEXT, _UNIQUE, _REPLY = 1 << 40, 2 << 40, 3 << 40


@dataclass(frozen=True, slots=True)
class WorkItem:
    arrival_s: float
    segments: tuple[Segment, ...]
    input_length: int
    output_length: int
    reply: int  # segment id of the answer's tokens
    # A session's later request: the `reply` of the answer its history ends with, and the seconds
    # from that answer's end to this request (the user's thinking, the agent's tool call).
    after: int | None = None
    after_s: float = 0.0


@dataclass
class Workload:
    """A named workload; `at_rate(rate)` gives its requests sorted by arrival, ~`rate` per second."""

    name: str
    at_rate: Callable[[float], list[WorkItem]]
    native_rate: float | None = None  # a trace's own mean rate
    params: dict = field(default_factory=dict)


class _Ids:
    """Fresh segment ids of the `_UNIQUE` range, deterministic per workload."""

    def __init__(self):
        self.next = _UNIQUE

    def __call__(self) -> int:
        self.next += 1
        return self.next


def _around(rng: random.Random, mean: int) -> int:
    """A length uniform in [mean/2, 3 mean/2], at least 1."""
    return max(1, rng.randint(mean // 2, mean + mean // 2))


def _item(arrival: float, segments: list[Segment], output: int, reply: int, after: int | None = None,
          after_s: float = 0.0) -> WorkItem:
    return WorkItem(arrival, tuple(segments), sum(length for _, length in segments), output, reply, after, after_s)


# -- Mooncake traces ------------------------------------------------------------------------


def read_mooncake(path: str | Path, trace_block_tokens: int = 512) -> list[WorkItem]:
    """One request per JSONL line: `timestamp` (ms), `input_length`, `output_length`,
    `hash_ids` (one per `trace_block_tokens` tokens of the prompt; equal ids, equal blocks)."""
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        try:
            items.append(_trace_item(len(items), record, trace_block_tokens))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: not a Mooncake trace record ({error!r})") from None
    items.sort(key=lambda item: item.arrival_s)
    return items


def _trace_item(index: int, record: dict, block_tokens: int) -> WorkItem:
    length, output = int(record["input_length"]), int(record["output_length"])
    if length < 1 or output < 1:
        raise ValueError("input_length and output_length must be positive")
    segments, left = [], length
    for hash_id in record["hash_ids"]:
        if left <= 0:
            break
        segments.append((int(hash_id), min(block_tokens, left)))
        left -= block_tokens
    if left > 0:  # more tokens than hash ids: the rest is the request's own
        segments.append((_UNIQUE - 1 - index, left))
    return WorkItem(float(record["timestamp"]) / 1000.0, tuple(segments), length, output, _REPLY + index)


def write_mooncake(path: str | Path, records: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def mooncake_records(items: list[WorkItem]) -> list[dict]:
    """Trace items back to Mooncake records (for items read from a trace)."""
    return [{"timestamp": _milliseconds(item.arrival_s), "input_length": item.input_length,
             "output_length": item.output_length, "hash_ids": [s for s, _ in item.segments if s < _CONTEXT]}
            for item in items]


def mooncake_from_prompts(prompts: list[list[int]], arrivals_s: list[float], output_length: int,
                          block_tokens: int) -> list[dict]:
    """Mooncake records of token-id prompts (a load generator's), one hash id per
    `block_tokens` tokens: equal ids where two prompts hold the same block after the same
    prefix, as the engine's chained block hashes see them, and a last partial block named by
    its prefix and its tokens."""
    ids: dict = {}
    records = []
    for prompt, arrival in zip(prompts, arrivals_s):
        chain = hash_block_chain(prompt, block_tokens)
        keys: list = list(chain)
        if len(prompt) % block_tokens:
            keys.append((chain[-1] if chain else b"", tuple(prompt[len(chain) * block_tokens :])))
        hash_ids = [ids.setdefault(key, len(ids)) for key in keys]
        records.append({"timestamp": _milliseconds(arrival), "input_length": len(prompt),
                        "output_length": output_length, "hash_ids": hash_ids})
    return records


def _milliseconds(seconds: float) -> int | float:
    ms = round(seconds * 1000.0, 3)
    return int(ms) if ms == int(ms) else ms


def trace_workload(path: str | Path, trace_block_tokens: int = 512) -> Workload:
    """A trace replayed at any mean rate by scaling its clock (arrival order kept)."""
    items = read_mooncake(path, trace_block_tokens)
    if len(items) < 2:
        raise ValueError(f"{path}: a trace needs at least two requests")
    start, span = items[0].arrival_s, items[-1].arrival_s - items[0].arrival_s
    native = (len(items) - 1) / span if span > 0 else float("inf")

    def at_rate(rate: float) -> list[WorkItem]:
        scale = native / rate if span > 0 else 0.0
        return [WorkItem((i.arrival_s - start) * scale, i.segments, i.input_length, i.output_length, i.reply)
                for i in items]

    return Workload(Path(path).stem, at_rate, native, {"trace": str(path), "requests": len(items)})


# -- generators -------------------------------------------------------------------------------


def _poisson(rng: random.Random, rate: float):
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def llmd_shared_context(num_requests: int, rate: float, seed: int, customers: int = 150,
                        context_tokens: int = 6000, question_tokens: int = 1200,
                        output_tokens: int = 1000) -> list[WorkItem]:
    """llm-d's long shared context: each request is one customer's fixed context (the
    customer picked at random) followed by a new question."""
    rng, ids = random.Random(seed), _Ids()
    arrivals = _poisson(rng, rate)
    items = []
    for index in range(num_requests):
        customer = rng.randrange(customers)
        segments = [(_CONTEXT + customer, context_tokens), (ids(), question_tokens)]
        items.append(_item(next(arrivals), segments, output_tokens, _REPLY + index))
    return items


def _sessions(num_requests: int, rate: float, seed: int, turns: int, start: Callable, step: Callable,
              gap: Callable, warmup_s: float, closed_loop: bool) -> list[WorkItem]:
    """Requests of sessions that start as a Poisson process (`rate` / `turns` per second; a
    session has `turns` requests on average): `start(rng, ids)` gives a session's opening
    segments, `step(rng, ids)` the segments added before each later request (after the
    previous answer), `gap(rng)` the seconds between a session's requests. Each request
    re-sends the whole history. Sessions start from `-warmup_s` on and only requests from
    time 0 on are kept, so the rate is steady from the start (sessions already under way
    join with their history, which no cache has yet).

    Open loop (as a trace is replayed), a request goes out `gap` after the previous one
    went out, even if its answer, which the request's history holds, is not finished yet.
    `closed_loop`: `gap` after that answer ended (`WorkItem.after`), as a user or an agent
    waits for the answer; the arrival times given are then where the requests fall in the
    run's order and cut only."""
    rng, ids = random.Random(seed), _Ids()
    starts = _poisson(rng, rate / turns)
    items: list[WorkItem] = []
    for session in itertools.count():
        t = next(starts) - warmup_s
        # later sessions only add requests after t: stop once n requests come before it
        if session % 256 == 0 and sum(1 for item in items if item.arrival_s < t) >= num_requests:
            break
        history, answer = start(rng, ids), None
        for _ in range(rng.randint(max(1, turns // 2), turns + turns // 2)):
            after, after_s = None, 0.0
            if answer is not None:
                history = history + [answer] + step(rng, ids)
                after_s = gap(rng)
                after = answer[0] if closed_loop else None
                t += after_s
            answer = (_REPLY + ids(), _around(rng, 300))
            if t >= 0:
                items.append(_item(t, history, answer[1], answer[0], after, after_s))
    items.sort(key=lambda item: item.arrival_s)
    return items[:num_requests]


def multi_turn_chat(num_requests: int, rate: float, seed: int, system_prompts: int = 8,
                    system_tokens: int = 1000, user_tokens: int = 200, turns: int = 6,
                    think_s: float = 20.0, closed_loop: int = 0) -> list[WorkItem]:
    """Chats: one of a few system prompts, then user turns and answers, a turn every
    ~`think_s` seconds (after the answer with `closed_loop`), each re-sending the
    conversation so far."""
    return _sessions(
        num_requests, rate, seed, turns,
        start=lambda rng, ids: [(_CONTEXT + 10_000 + rng.randrange(system_prompts), system_tokens),
                                (ids(), _around(rng, user_tokens))],
        step=lambda rng, ids: [(ids(), _around(rng, user_tokens))],
        gap=lambda rng: rng.expovariate(1.0 / think_s), warmup_s=2 * turns * think_s, closed_loop=bool(closed_loop),
    )


def agentic_tool_loop(num_requests: int, rate: float, seed: int, agents: int = 4, tools_tokens: int = 4000,
                      task_tokens: int = 500, tool_output_tokens: int = 600, steps: int = 12,
                      interval_s: float = 3.0, closed_loop: int = 0) -> list[WorkItem]:
    """Agents: a shared tools-and-instructions context, a task, then a loop that appends the
    model's action and the tool's output and re-sends the growing context every few seconds
    (`closed_loop`: that long after the action, the tool's run)."""
    return _sessions(
        num_requests, rate, seed, steps,
        start=lambda rng, ids: [(_CONTEXT + 20_000 + rng.randrange(agents), tools_tokens),
                                (ids(), _around(rng, task_tokens))],
        step=lambda rng, ids: [(ids(), _around(rng, tool_output_tokens))],
        gap=lambda rng: rng.uniform(0.5 * interval_s, 1.5 * interval_s), warmup_s=2 * steps * interval_s,
        closed_loop=bool(closed_loop),
    )


def no_reuse(num_requests: int, rate: float, seed: int, input_tokens: int = 2000,
             output_tokens: int = 250) -> list[WorkItem]:
    """Every prompt its own: the floor, where routing can only balance load."""
    rng, ids = random.Random(seed), _Ids()
    arrivals = _poisson(rng, rate)
    return [_item(next(arrivals), [(ids(), _around(rng, input_tokens))], _around(rng, output_tokens), _REPLY + k)
            for k in range(num_requests)]


GENERATORS = {
    "llmd": llmd_shared_context,
    "chat": multi_turn_chat,
    "agentic": agentic_tool_loop,
    "noreuse": no_reuse,
}


def generated_workload(name: str, num_requests: int, seed: int, **params) -> Workload:
    if name not in GENERATORS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(GENERATORS)}")
    generator = GENERATORS[name]
    return Workload(name, lambda rate: generator(num_requests, rate, seed, **params), None,
                    {"requests": num_requests, **params})
