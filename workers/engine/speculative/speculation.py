"""The engine's side of speculative decoding: which sequences get proposals this step, how many
proposed tokens each verification kept, and the counters of both.

A step verifies a sequence's proposal by sampling every one of its 1 + k positions as a plain
step would (the same filters, and for a seeded request the uniform number of that output
index), then keeping the proposed tokens while they equal the target's, plus the target's token
at the first difference (or after the last). For a point-mass proposal this is exactly
rejection sampling: a proposed token x is kept with probability p(x) = min(1, p(x) / q(x)), and
a token drawn from p given that it is not x follows the residual max(0, p - q), normalised.
A draft model's sampled proposals carry their distribution q, and the runner verifies them by
the general rule instead (`workers/runner/rejection_sampling.py`)."""

from typing import Protocol

from kvserve.workers.engine.config import SpeculativeConfig
from kvserve.workers.engine.outputs import SpeculativeStats
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.scheduler import ScheduledBatch
from kvserve.workers.engine.sequence import PENDING_TOKEN, Sequence
from kvserve.workers.engine.speculative.ngram import NgramProposer


def speculates(params: SamplingParams) -> bool:
    """Whether a request may verify proposals: not with penalties or bad words (each position
    would need the drafts before it among its tokens) nor a grammar (its matcher takes one token
    at a time)."""
    return params.speculative and params.structured is None and not params.reads_tokens


class DraftModel(Protocol):
    """A draft model run beside the engine (`workers/runner/draft_model.py`)."""

    def propose(self, seqs: list[Sequence], block_tables: dict[str, list[int]]) -> None:
        """Replace the placeholders of each sequence's `draft_token_ids` with the draft's tokens
        and set its `draft_probs`; its block table has slots for them."""


class Speculation:
    def __init__(self, config: SpeculativeConfig, draft_model: DraftModel | None = None):
        if (config.method == "draft") != (draft_model is not None):
            raise ValueError(f"speculative method {config.method!r} {'needs' if draft_model is None else 'takes no'} "
                             "draft model")
        self.proposer = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min,
                                      config.prompt_lookup_max)
        self.draft_model = draft_model
        k = config.num_speculative_tokens
        self.proposed_at = [0] * k  # proposals that reached position j
        self.accepted_at = [0] * k  # ... and kept the token there
        self.verifications = 0

    def propose(self, running: list[Sequence]) -> None:
        """Set each running sequence's `draft_token_ids`: empty unless it is decoding (all but
        its last token computed) and may speculate. Never so many that the tokens a step may
        keep, drafts and the target's token after them, pass the sequence's length limit. A
        draft model's are placeholders until `draft`, once the scheduler has made room for them."""
        for seq in running:
            seq.draft_probs = None
            seq.draft_token_ids = self._proposal(seq) if self._may_propose(seq) else []

    def _proposal(self, seq: Sequence) -> list[int]:
        limit = seq.max_num_tokens - seq.num_tokens - 1
        if self.draft_model is None:
            return self.proposer.propose(seq.token_ids, limit)
        return [PENDING_TOKEN] * max(0, min(limit, self.proposer.num_tokens))

    def draft(self, batch: ScheduledBatch, block_tables: dict[str, list[int]]) -> None:
        """Run the draft model, if any, for the scheduled sequences that kept room for proposals."""
        seqs = [seq for seq in batch.seqs if seq.draft_token_ids] if self.draft_model is not None else []
        if seqs:
            self.draft_model.propose(seqs, block_tables)

    @staticmethod
    def _may_propose(seq: Sequence) -> bool:
        return (seq.num_computed_tokens == seq.num_tokens - 1 and speculates(seq.params) and seq.pooled is None
                and seq.num_output_tokens >= seq.params.min_tokens)

    def num_accepted(self, drafts: list[int], targets: list[int]) -> int:
        """How many leading drafts equal the target's tokens; counted."""
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
            accepted += 1
        if drafts:
            self.verifications += 1
            for j in range(len(drafts)):
                self.proposed_at[j] += 1
            for j in range(accepted):
                self.accepted_at[j] += 1
        return accepted

    def stats(self) -> SpeculativeStats:
        return SpeculativeStats(proposed=sum(self.proposed_at), accepted=sum(self.accepted_at),
                                verifications=self.verifications, proposed_at=tuple(self.proposed_at),
                                accepted_at=tuple(self.accepted_at))
