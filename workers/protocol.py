"""Every message that crosses a process boundary: ingress -> replica (the generate request),
replica -> ingress (streamed output deltas), replica -> KV event hub (registration, event
batches, stats) and hub -> routers (news of every replica).

All are frozen dataclasses that Ray pickles as they are; readers use attributes, and a field
left out is an error when the message is built, never a silent 0 where it is read. Messages
the engine itself produces are defined beside it and named here: `KVEventBatch` and its
event kinds (`workers/engine/kv_events.py`), `EngineStats` and `TokenLogprobs`
(`workers/engine/outputs.py`), and the rule for a prompt's length that both ends apply
(`workers/engine/prompt_checks.py`). This module imports nothing heavier than those, so the
router can use it without loading the engine.
"""

from dataclasses import dataclass

from kvserve.workers.engine.block_hash import BlockHash
from kvserve.workers.engine.kv_events import (
    AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch,
)
from kvserve.workers.engine.outputs import EngineStats, TokenLogprobs
from kvserve.workers.engine.prompt_checks import prompt_length_problem
from kvserve.workers.engine.sampling_params import SamplingParams

__all__ = [
    "AllBlocksCleared", "BlockHash", "BlockRemoved", "BlockSnapshot", "BlockStored", "EngineStats",
    "GenerateRequest", "HubNews", "KVEvent", "KVEventBatch", "OutputDelta", "ReplicaNews",
    "ReplicaRegistration", "SampleDelta", "SamplingParams", "TokenLogprobs", "prompt_length_problem",
]

# -- ingress <-> replica -------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt to generate for, as token ids. `block_hashes` are the prompt's full blocks
    hashed by the ingress; the KV-aware router routes on them, and the replica reuses them
    when `hash_check` equals its own (same block size and hash function). `prompt` (the
    text) is for the text-based baseline router."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str
    block_hashes: list[BlockHash]
    hash_check: str
    cache_salt: str | None
    priority: int


@dataclass(frozen=True)
class SampleDelta:
    """What one sample of a request added in one engine step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one per new token, when the request asked
    finish_reason: str | None


@dataclass(frozen=True)
class OutputDelta:
    """One streamed update of a request: the samples that changed in one step."""

    replica: str
    num_prompt_tokens: int
    num_cached_tokens: int
    samples: list[SampleDelta]
    finished: bool


# -- replica <-> KV event hub <-> routers --------------------------------------------------


@dataclass(frozen=True)
class BlockSnapshot:
    """A replica's whole block set as of its event batch `seq`."""

    seq: int
    blocks: list[BlockHash]


@dataclass(frozen=True)
class ReplicaRegistration:
    """A replica joining the hub, or joining it again from a snapshot of its blocks."""

    replica: str
    block_size: int
    hash_check: str
    actor: object  # the replica's actor handle, which the hub pings for liveness
    snapshot: BlockSnapshot
    stats: EngineStats


@dataclass(frozen=True)
class ReplicaNews:
    """What a follower learns of one replica: event batches after its cursor, or a
    snapshot when the hub no longer has them all (or the follower saw a gap)."""

    block_size: int
    hash_check: str
    stats: EngineStats
    batches: list[KVEventBatch] | None
    snapshot: BlockSnapshot | None


@dataclass(frozen=True)
class HubNews:
    """One answer of the hub to a follower; `version` goes up with every change."""

    version: int
    replicas: dict[str, ReplicaNews]
