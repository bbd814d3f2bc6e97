"""Verifying proposals drawn from a draft model's distribution q, keeping the target's p exactly.

Proposed token x at position j is kept with probability min(1, p(x) / q(x)); at the first one
refused, the token is drawn from the residual max(0, p - q), normalised, and the proposal ends
there; after k kept tokens the target's own draw at position k follows. p and q are both the
filtered distributions of the request's params (allowed_token_ids, logit_bias, temperature,
top-k, top-p, min-p): the draft draws from its q with the same filters as the target's p.

Greedy requests and point-mass proposals (n-gram) need none of this: the sampler's draw at each
position equals the proposed token exactly as often as this rule keeps it.

Uniform numbers: a seeded request's are a function of its seed, the index of the output token
and what the number is for (the draft's draw, the acceptance test, the residual draw), so that
its tokens are reproducible; the others come from torch's default generator.
"""

import enum
from dataclasses import dataclass

import numpy as np
import torch

from kvserve.workers.engine.executor import SampleRequest
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.runner.sampler import (
    SampledTokens, allowed_token_masks, draw_weights, logit_bias_entries, seed_streams, seeded_uniforms,
    unseeded_uniforms,
)


class Use(enum.IntEnum):
    """What a seeded request's uniform number is for: each use has a stream of its own, past the
    sampler's own draws (`sampler.seeded_uniforms`' attempts 0 and 1)."""

    DRAFT = 2
    ACCEPT = 3
    RESIDUAL = 4


@dataclass(slots=True)
class DrawnProposal:
    """One sample's proposal drawn from a draft distribution: its first verification row in the
    step's sample rows, the proposed tokens and the draft's distribution q of each ([k, vocab])."""

    first_row: int
    token_ids: list[int]
    probs: torch.Tensor


def drawn_proposals(samples: list[SampleRequest]) -> list[DrawnProposal]:
    """The proposals of a speculative step's samples that a draft model drew (not greedily):
    each sample takes 1 + k consecutive rows, k its proposed tokens."""
    proposals, row = [], 0
    for request in samples:
        seq = request.seq
        if seq.draft_token_ids and seq.draft_probs is not None:
            proposals.append(DrawnProposal(row, seq.draft_token_ids, seq.draft_probs))
        row += 1 + len(seq.draft_token_ids)
    return proposals


def proposal_logits(logits: torch.Tensor, proposals: list[DrawnProposal]) -> torch.Tensor:
    """A copy of the logits of every proposed token's verification row, in the order of
    `proposals` (the sampler uses `logits` as scratch space)."""
    rows = [p.first_row + j for p in proposals for j in range(len(p.token_ids))]
    return logits[torch.tensor(rows, device=logits.device)]  # indexing by a tensor copies


@torch.inference_mode()
def verify_drawn(sampled: SampledTokens, logits: torch.Tensor, proposals: list[DrawnProposal]) -> None:
    """Replace the sampled tokens of the proposals' rows by the rejection-sampling rule's:
    `logits` are `proposal_logits`, untouched by the sampler. A row past a proposal's first
    refused token keeps its token, which the engine never reads; so does the row after a
    proposal kept whole, the target's own draw."""
    sample_rows = [p.first_row + j for p in proposals for j in range(len(p.token_ids))]
    rows = [sampled.rows[r] for r in sample_rows]
    seeds = [row.seed for row in rows]
    positions = [j for p in proposals for j in range(len(p.token_ids))]
    counters = [row.num_output_tokens + j for row, j in zip(rows, positions)]
    target = filtered_probs(logits.float(), [row.params for row in rows])
    draft = torch.cat([p.probs for p in proposals]).to(target.device, target.dtype)
    unusable = ~(target.sum(dim=-1) > 0)  # NaN logits: the sampler reports such a row as NO_TOKEN
    target[unusable] = draft[unusable]
    drafted = torch.tensor([t for p in proposals for t in p.token_ids], device=target.device)[:, None]
    ratio = (target.gather(1, drafted) / draft.gather(1, drafted)).squeeze(1)
    accepted = (uniforms(seeds, counters, Use.ACCEPT, target.device) < ratio).tolist()
    chosen: dict[int, int] = {}  # flat proposal row -> its token
    refused, flat = [], 0
    for proposal in proposals:
        k = len(proposal.token_ids)
        kept = (accepted[flat : flat + k] + [False]).index(False)
        chosen.update({flat + j: proposal.token_ids[j] for j in range(kept)})
        if kept < k:
            refused.append(flat + kept)
        flat += k
    if refused:
        residual = (target[refused] - draft[refused]).clamp_min_(0.0)
        empty = residual.sum(dim=-1) <= 0  # p == q up to rounding: then p itself
        residual[empty] = target[refused][empty]
        draws = draw_weights(residual, uniforms([seeds[i] for i in refused], [counters[i] for i in refused], Use.RESIDUAL,
                                        target.device))
        chosen.update(zip(refused, draws.tolist()))
    _put_tokens(sampled, logits, [sample_rows[i] for i in chosen], list(chosen), list(chosen.values()))


def _put_tokens(sampled: SampledTokens, logits: torch.Tensor, rows: list[int], flat: list[int],
                tokens: list[int]) -> None:
    """Sample rows `rows` take `tokens`; those that asked for logprobs get their new token's,
    from the raw logits at `flat`."""
    device = sampled.token_ids.device
    sampled.token_ids[torch.tensor(rows, device=device)] = torch.tensor(tokens, device=device)
    where = {row: k for k, row in enumerate(sampled.logprob_rows)}
    wanted = [(where[r], f, t) for r, f, t in zip(rows, flat, tokens) if r in where]
    if not wanted:
        return
    at, flat_rows, token_ids = (torch.tensor(values, device=logits.device) for values in zip(*wanted))
    logprobs = logits[flat_rows].float().log_softmax(dim=-1).gather(1, token_ids[:, None]).squeeze(1)
    sampled.sampled_logprobs[at.to(sampled.sampled_logprobs.device)] = logprobs.to(sampled.sampled_logprobs)


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's distribution after its allowed_token_ids, logit_bias, temperature, top-k,
    top-p and min-p, as the sampler draws from it: top-k keeps ties with its k-th token; top-p
    keeps a token while the mass of the tokens strictly more likely than it is below top_p,
    that mass over what top-k kept (the whole row without top-k); min-p keeps p >= min_p *
    p_max. Rows are not greedy."""
    vocab = logits.shape[1]
    column = lambda values: torch.tensor(values, dtype=logits.dtype, device=logits.device)[:, None]  # noqa: E731
    if any(p.logit_bias or p.allowed_token_ids is not None for p in params):
        logits = logits.clone()
        rows, masks = allowed_token_masks(params, logits)
        logits[rows] += masks
        rows, tokens, biases = logit_bias_entries(params, logits)
        logits[rows, tokens] += biases
    probs = (logits / column([p.temperature for p in params])).softmax(dim=-1)
    descending = probs.sort(dim=-1, descending=True).values
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    kth = descending.gather(1, torch.tensor([max(k - 1, 0) for k in top_k], device=logits.device)[:, None])
    keep = probs >= torch.where(column(top_k) > 0, kth, torch.zeros_like(kth))
    min_p_keep = probs >= column([p.min_p for p in params]) * descending[:, :1]
    if any(p.top_p < 1.0 for p in params):
        kept = probs * keep
        keep &= _mass_above(kept) < column([p.top_p for p in params]) * kept.sum(-1, True)
    probs = probs * (keep & min_p_keep)
    return probs / probs.sum(dim=-1, keepdim=True)


def _mass_above(weights: torch.Tensor) -> torch.Tensor:
    """For each token, the weight of the tokens strictly heavier than it."""
    descending = weights.sort(dim=-1, descending=True).values
    exclusive = descending.cumsum(dim=-1) - descending
    first_tie = torch.searchsorted((-descending).contiguous(), (-weights).contiguous())
    return exclusive.gather(1, first_tie.clamp_max_(weights.shape[1] - 1))


def uniforms(seeds: list[int | None], counters: list[int], use: Use, device: torch.device) -> torch.Tensor:
    """A number in [0, 1) per row: for a seeded row a function of its seed, `counter` (the
    index of the output token) and `use`; else from torch's default generator."""
    values = unseeded_uniforms((len(seeds),))
    seeded = [i for i, seed in enumerate(seeds) if seed is not None]
    if seeded:
        values[seeded] = seeded_uniforms(seed_streams([seeds[i] for i in seeded]),
                                         np.asarray([counters[i] for i in seeded]), int(use))
    return torch.from_numpy(values).to(device)
