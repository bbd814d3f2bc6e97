"""The engine's view of one sample of one request: its tokens and where it stands."""

import enum

from kvserve.workers.engine.block_hash import BlockHash
from kvserve.workers.engine.retention import KVRetention
from kvserve.workers.engine.sampling_params import SamplingParams


PENDING_TOKEN = -1  # an output token whose value the device has not handed back yet


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


class Sequence:
    """One generation stream. A request with `n > 1` has n of them: sample 0 is scheduled
    first; the others are forked from it, sharing its prompt blocks, once its prompt is done."""

    # Slots, the fields that every step reads of every running sequence first, so that they
    # share the object's first cache line: the step loop's cost is mostly memory reads.
    __slots__ = (
        "num_computed_tokens", "kv_quiet_below", "token_ids", "last_token_pending", "draft_token_ids",
        "seq_id", "request_id", "sample_index", "params", "priority", "arrival", "cache_salt", "lora_name",
        "kv_retention", "num_prompt_tokens", "num_cached_prompt_tokens", "block_hashes", "status",
        "finish_reason", "num_preemptions", "forks", "num_pending", "sample_row", "seed", "draft_probs",
        "num_draft_computed", "matcher", "pooled", "max_num_tokens", "ending_token_ids",
        "prompt_logprobs", "bad_word_ids",
    )

    def __init__(
        self,
        request_id: str,
        sample_index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival: float,
        priority: int = 0,
        cache_salt: str | None = None,
        max_num_tokens: int | None = None,
        ending_token_ids: frozenset[int] = frozenset(),
        kv_retention: KVRetention | None = None,
        lora_name: str | None = None,
    ):
        self.request_id = request_id
        self.sample_index = sample_index
        self.seq_id = f"{request_id}#{sample_index}"
        self.params = params
        self.priority = priority
        self.arrival = arrival
        self.cache_salt = cache_salt
        self.lora_name = lora_name  # the LoRA adapter it runs under; None: the base model
        self.kv_retention = kv_retention  # None: every block at the default retention priority
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        # Below this many tokens its next tokens need nothing from the KV cache manager (they fit
        # its blocks and fill none to cache): set by the manager, read for every decode.
        self.kv_quiet_below = 0
        self.num_cached_prompt_tokens = 0
        self.block_hashes: list[BlockHash] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.forks: list[Sequence] = []  # samples 1..n-1, waiting for this prompt to finish
        # Async scheduling: output tokens still being computed sit at the end of `token_ids` as
        # PENDING_TOKEN; `sample_row` is this sequence's row among the last step's samples, and
        # `last_token_pending` says the pending token is its last (max_tokens or max_model_len).
        self.num_pending = 0
        self.sample_row = -1
        self.last_token_pending = False
        self.seed = self._sample_seed(params.seed, sample_index)
        # Speculative decoding: tokens proposed to follow `token_ids`, verified by the coming step;
        # the draft model's distribution of each ([k, vocab]) when it drew them (None: point masses);
        # how many leading tokens have their KV in the draft model's cache (0 after a preemption).
        self.draft_token_ids: list[int] = []
        self.draft_probs = None
        self.num_draft_computed = 0
        self.matcher = None  # a StructuredMatcher: where its output stands in its grammar, if it has one
        self.pooled = None  # a PooledPrompt for an embedding request, which is never decoded
        # With `params.prompt_logprobs`, on the sample that computes the prompt: per prompt
        # position, the logprobs of its token (None at 0, and where not computed yet), until
        # they are handed out with the first output token.
        self.prompt_logprobs: list | None = None
        self.bad_word_ids: tuple[tuple[int, ...], ...] = ()  # `params.bad_words` as token sequences
        # Where it ends at the latest (max_tokens, or a shorter model length), and the tokens
        # that may end it (stop tokens, EOS): checked for every token, so worked out once.
        self.max_num_tokens = min(self.num_prompt_tokens + params.max_tokens, max_num_tokens or 1 << 62)
        self.ending_token_ids = frozenset(params.stop_token_ids) | ending_token_ids

    @staticmethod
    def _sample_seed(seed: int | None, sample_index: int) -> int | None:
        """The request's seed plus the sample's index, so that the samples of one request differ;
        wrapped into the signed 64-bit range that seeds are given in."""
        if seed is None:
            return None
        return (seed + sample_index + 2**63) % 2**64 - 2**63

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
