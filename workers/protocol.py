"""Every message that crosses a process boundary: ingress -> replica (the generate request),
replica -> ingress (streamed output deltas), replica -> KV event hub (registration, event
batches, heartbeats) and hub -> routers (news of every replica).

All are frozen dataclasses that Ray pickles as they are; readers use attributes, and a field
left out is an error when the message is built, never a silent 0 where it is read. Messages
the engine itself produces are defined beside it and named here: `KVEventBatch`, its
event kinds and `BlockSnapshot` (`workers/engine/kv_events.py`), `EngineStats` (with its
`GrammarTimings` and `SpeculativeStats`) and `TokenLogprobs`
(`workers/engine/outputs.py`), the rule for a prompt's length that both ends apply
(`workers/engine/prompt_checks.py`), and the output constraint a request may carry
(`workers/engine/structured_spec.py`). This module imports nothing heavier than those, so the
router can use it without loading the engine.
"""

from dataclasses import dataclass

from kvserve.workers.engine.block_hash import BlockHash
from kvserve.workers.engine.kv_events import (
    AllBlocksCleared, BlockRemoved, BlockSnapshot, BlockStored, KVEvent, KVEventBatch,
)
from kvserve.workers.engine.outputs import (
    EmbeddingOutput, EngineStats, GrammarTimings, HostTierStats, PromptLogprobs, SpeculativeStats, StepCost,
    TokenLogprobs,
)
from kvserve.workers.engine.prompt_checks import Overloaded, prompt_length_problem
from kvserve.workers.engine.retention import DEFAULT_RETENTION_PRIORITY, KVRetention, RetentionRange
from kvserve.workers.engine.sampling_params import SamplingParams, ThinkingBudget
from kvserve.workers.engine.structured_spec import StructuredOutputSpec

__all__ = [
    "DEFAULT_RETENTION_PRIORITY", "AllBlocksCleared", "BlockHash", "BlockRemoved", "BlockSnapshot", "BlockStored", "EmbedRequest", "EmbeddingOutput",
    "EngineStats", "GenerateRequest", "GrammarTimings", "Heartbeat", "HostTierStats", "HubNews", "KVCursor", "KVEvent",
    "KVEventBatch", "KVRetention", "OutputDelta", "PromptLogprobs", "ReplicaNews", "ReplicaRegistration", "RequestRefused", "RetentionRange",
    "SampleDelta", "SamplingParams", "SpeculativeStats", "StepCost", "StructuredOutputSpec", "ThinkingBudget",
    "TokenLogprobs",
    "prompt_length_problem",
]

# -- ingress <-> replica -------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedRequest:
    """One prompt to embed, as token ids; `prompt`, `block_hashes` and `hash_check` as in
    `GenerateRequest`, so the routers place it the same way. The replica answers with an
    `EmbeddingOutput` or a `RequestRefused`."""

    request_id: str
    prompt_token_ids: list[int]
    prompt: str
    block_hashes: list[BlockHash]
    hash_check: str
    cache_salt: str | None
    priority: int


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt to generate for, as token ids. `block_hashes` are the prompt's full blocks
    hashed by the ingress (under the request's adapter); the KV-aware router routes on them,
    and the replica reuses them when `hash_check` equals its own (same block size and hash function). `prompt` (the
    text) is for the text-based baseline router."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str
    block_hashes: list[BlockHash]
    hash_check: str
    cache_salt: str | None
    priority: int
    kv_retention: KVRetention | None  # None: every block at the default retention priority
    lora_name: str | None  # the LoRA adapter to run under; None: the base model
    lora_path: str | None  # its folder, which the replica loads it from if it has not yet; None: already loaded there


@dataclass(frozen=True)
class SampleDelta:
    """What one sample of a request added in one engine step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one per new token, when the request asked
    finish_reason: str | None
    stop_reason: str | int | None  # the stop string or stop token that ended it


@dataclass(frozen=True)
class RequestRefused:
    """The replica's only answer to a request its engine cannot take: as it stands (the
    request's own problem, such as more KV blocks than the pool has; the ingress answers 400),
    or now (`overloaded`: past `max_queue_wait_s`; 503 with Retry-After)."""

    reason: str
    overloaded: bool
    replica: str  # the replica that refused: its router forgets the send (the prompt was not cached there)

    @classmethod
    def of(cls, error: ValueError, replica: str) -> "RequestRefused":
        """`replica`'s answer to its engine's refusal `error`."""
        return cls(str(error), isinstance(error, Overloaded), replica)


@dataclass(frozen=True)
class OutputDelta:
    """One streamed update of a request: the samples that changed in one step."""

    replica: str
    num_prompt_tokens: int
    num_cached_tokens: int
    samples: list[SampleDelta]
    finished: bool
    prompt_logprobs: PromptLogprobs | None  # in the delta with the first token, when the request asked


# -- replica <-> KV event hub <-> routers --------------------------------------------------


# A replica publishes a heartbeat at least this often, with or without events; a router
# that hears none for MISSED_HEARTBEATS periods stops trusting its picture of that replica.
HEARTBEAT_PERIOD_S = 0.25
MISSED_HEARTBEATS = 8


@dataclass(frozen=True)
class Heartbeat:
    """A replica's position in its event stream, and its load: after batch `seq` of `epoch`
    it caches `num_blocks` blocks. `sent_at` (its wall time) makes every heartbeat distinct."""

    epoch: int
    seq: int
    sent_at: float
    stats: EngineStats

    @property
    def num_blocks(self) -> int:
        return self.stats.kv_blocks_cached


@dataclass(frozen=True)
class ReplicaRegistration:
    """A replica joining the hub, or joining it again from a snapshot of its blocks."""

    replica: str
    block_size: int
    hash_check: str
    actor: object  # the replica's actor handle, which the hub pings for liveness
    snapshot: BlockSnapshot
    heartbeat: Heartbeat


@dataclass(frozen=True)
class KVCursor:
    """How far a follower has applied one replica's events, and the `sent_at` of the
    replica's heartbeat it holds (None: unknown, so the hub sends it)."""

    epoch: int
    seq: int
    heard: float | None


@dataclass(frozen=True)
class ReplicaNews:
    """What a follower learns of one replica: its last heartbeat, and the event batches after
    the follower's cursor, or a snapshot when the hub no longer has them all (or the cursor
    is of another epoch, or missing)."""

    block_size: int
    hash_check: str
    heartbeat: Heartbeat
    batches: list[KVEventBatch] | None
    snapshot: BlockSnapshot | None


@dataclass(frozen=True)
class HubNews:
    """One answer of the hub to a follower; `version` goes up with every change. `followers`:
    how many followers (a router each, one per ingress replica) polled the hub lately.
    `replicas` holds the news of those with something the follower's cursor lacks; `relayed`
    names every replica the hub relays."""

    version: int
    replicas: dict[str, ReplicaNews]
    followers: int
    relayed: frozenset[str]
