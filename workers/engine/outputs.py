"""What the engine hands back after each step, per request."""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

# The most (priority, count) pairs a heartbeat carries of the waiting queue; see `count_priorities`.
WAITING_PRIORITY_PAIRS = 8


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely tokens and their logprobs
    rank: int | None = None  # of `token_id` among all tokens, 1 the most likely (prompt tokens only)


# Per prompt position, its token's logprobs given the tokens before it (None at position 0).
PromptLogprobs = list[TokenLogprobs | None]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # of every token so far; of the delta's in a stream
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    delta_text: str = ""  # what this step added
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # with `params.prompt_logprobs`, from the first token on

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass(frozen=True)
class StepCost:
    """A replica's steps as its engine measured them (`step_costs.StepCostFit`): seconds =
    base_s + per_prefill_token_s x prompt tokens computed + per_decode_seq_s x sequences
    decoding; a step computes at most `tokens_per_step` tokens (max_num_batched_tokens)."""

    base_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    tokens_per_step: int


@dataclass(frozen=True)
class EngineStats:
    """The engine's load and KV pool, as the replica publishes it to the routers."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int  # held by running or waiting-to-resume sequences
    kv_blocks_cached: int  # reusable prefix blocks, in use or not
    num_preemptions: int
    grammars: "GrammarTimings | None"  # structured outputs so far, once there were any
    speculative: "SpeculativeStats | None"  # proposals verified so far, where the engine speculates
    host_tier: "HostTierStats | None"  # the host-memory KV tier, when there is one
    # Waiting sequences per request priority (`count_priorities`), where the scheduler orders by
    # priority; empty under fcfs, where a newcomer waits behind every waiting sequence.
    waiting_by_priority: tuple[tuple[int, int], ...]
    lora_adapters: tuple[str, ...]  # the LoRA adapters in the replica's device slots now
    queued_tokens: int  # tokens its running and waiting sequences have still to compute
    step_cost: StepCost | None  # how long its steps take, once it has measured enough of them
    working_set_blocks: int  # distinct prompt blocks its requests asked for within `working_set.WINDOW_S`

    def waiting_ahead_of(self, priority: int) -> int:
        """Waiting sequences a new request of `priority` would queue behind by priority alone:
        those of the same priority or a better (lower) one."""
        return sum(n for p, n in self.waiting_by_priority if p <= priority)


def count_priorities(priorities: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """(priority, how many) per priority value, best first, at most WAITING_PRIORITY_PAIRS
    pairs: the values past the last pair are counted in it, as if of its priority (better
    than theirs), so a reader counts them ahead of a request of that priority or worse only."""
    pairs = sorted(Counter(priorities).items())
    if len(pairs) <= WAITING_PRIORITY_PAIRS:
        return tuple(pairs)
    kept, rest = pairs[: WAITING_PRIORITY_PAIRS - 1], pairs[WAITING_PRIORITY_PAIRS - 1 :]
    return (*kept, (rest[0][0], sum(n for _, n in rest)))


@dataclass(frozen=True)
class EmbeddingOutput:
    """A prompt's embedding: its pooled final hidden states (see `pooling.py`)."""

    request_id: str
    embedding: list[float]
    num_prompt_tokens: int
    num_cached_tokens: int  # of the prompt, read from the prefix cache


@dataclass(frozen=True)
class HostTierStats:
    """The host-memory KV tier (`kv_offload_gib`) since the engine started: its pool, the
    prompt blocks found there, and the copies between it and the device."""

    blocks_total: int
    blocks_cached: int
    hit_blocks: int
    blocks_in: int  # copied back to the device
    blocks_out: int  # copied out from the device
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class GrammarTimings:
    """Time spent on structured outputs since the engine started: compiling grammars, and
    filling the steps' token masks."""

    compiled: int
    compile_s: float
    masked_steps: int
    mask_s: float


@dataclass(frozen=True)
class SpeculativeStats:
    """Speculative decoding since the engine started: proposed tokens verified and kept, in all
    and at each position of a proposal, and the sequence-steps that verified any."""

    proposed: int
    accepted: int
    verifications: int
    proposed_at: tuple[int, ...]
    accepted_at: tuple[int, ...]

    @property
    def acceptance_rate_at(self) -> tuple[float, ...]:
        return tuple(a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at))

    @property
    def mean_accepted_length(self) -> float:
        """Proposed tokens kept per verification (the target's own token not counted)."""
        return self.accepted / self.verifications if self.verifications else 0.0
