"""Prompt logprobs: how likely the model found each prompt token given the tokens before it
(vLLM's `prompt_logprobs`, and the echoed prompt of a completion asked for `logprobs`).

The logits at a prompt position score the prompt token after it. A step that computes a
chunk of such a prompt scores each of the chunk's positions whose next token is still the
prompt's (`StepRequest.prompt_scored` names the chunks). Every rank of a tensor-parallel group
computes their logits, since the vocabulary is gathered across the ranks; the rank that
samples reads them.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvserve.workers.engine.outputs import TokenLogprobs
from kvserve.workers.runner.transfer import to_device

# Positions whose logits are held at once: a 2048-token chunk's over a 150k-token vocabulary
# would take 1.2 GB in float32, and its log-softmax as much again.
_POSITIONS_AT_ONCE = 512


@dataclass
class PromptScoring:
    """The positions of a step that score a prompt token, as flat indices into the step's tokens."""

    rows: torch.Tensor  # [positions] long
    targets: torch.Tensor  # [positions] long: the prompt token each position predicts
    counts: list[int]  # per scored chunk, its positions (0 for a chunk of the prompt's last token alone)
    tops: list[int]  # per scored chunk, how many most likely tokens to report with each

    def to(self, device: torch.device) -> "PromptScoring":
        return PromptScoring(self.rows.to(device), self.targets.to(device), self.counts, self.tops)


def prompt_scoring(seqs: list, scored: list[int], query_starts: list[int], query_lens: list[int],
                   device: torch.device) -> PromptScoring | None:
    """The scoring of the chunks of `seqs[i]` for i in `scored`, whose new tokens start at their
    `num_computed_tokens` and at `query_starts[i]` in the step; None if nothing is scored."""
    if not scored:
        return None
    rows, targets, counts, tops = [], [], [], []
    for i in scored:
        seq = seqs[i]
        start = seq.num_computed_tokens
        count = max(0, min(start + query_lens[i], seq.num_prompt_tokens - 1) - start)
        rows += range(query_starts[i], query_starts[i] + count)
        targets += seq.token_ids[start + 1 : start + 1 + count]
        counts.append(count)
        tops.append(seq.params.prompt_logprobs)
    return PromptScoring(to_device(rows, torch.long, device), to_device(targets, torch.long, device), counts, tops)


@dataclass
class ScoredPrompts:
    """The scores of a step's prompt positions, still on the device."""

    scoring: PromptScoring
    logprobs: torch.Tensor  # [positions]: the prompt token's
    ranks: torch.Tensor  # [positions]: 1 + the tokens more likely than it
    top_values: torch.Tensor  # [positions, most asked for], most likely first
    top_ids: torch.Tensor

    def output(self) -> list[list[TokenLogprobs]]:
        """Per scored chunk, per position, the logprobs of the token it predicts."""
        targets, logprobs, ranks = (t.tolist() for t in (self.scoring.targets, self.logprobs, self.ranks))
        values, ids = self.top_values.tolist(), self.top_ids.tolist()
        chunks, at = [], 0
        for count, top in zip(self.scoring.counts, self.scoring.tops):
            chunks.append([TokenLogprobs(targets[k], logprobs[k], list(zip(ids[k][:top], values[k][:top])), ranks[k])
                           for k in range(at, at + count)])
            at += count
        return chunks


def score_prompts(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                  scoring: PromptScoring) -> ScoredPrompts:
    """Score the positions of `scoring` from the step's final hidden states, a slice at a time."""
    most = max(scoring.tops)
    parts = []
    for start in range(0, len(scoring.rows), _POSITIONS_AT_ONCE):
        rows = scoring.rows[start : start + _POSITIONS_AT_ONCE]
        logprobs = compute_logits(hidden[rows]).float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, scoring.targets[start : start + _POSITIONS_AT_ONCE, None])
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        parts.append((chosen.squeeze(1), ranks, *logprobs.topk(most, dim=-1)))
    if not parts:
        empty = hidden.new_empty(0, dtype=torch.float32)
        return ScoredPrompts(scoring, empty, empty.long(), empty.view(0, most), empty.long().view(0, most))
    return ScoredPrompts(scoring, *(torch.cat(column) for column in zip(*parts)))
