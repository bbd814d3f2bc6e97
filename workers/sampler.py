"""Turns one step's logits into the next token of every sampling sequence, in one batch."""

from dataclasses import dataclass

import torch

from kvserve.workers.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence that samples this step. `generator` is set when the request has a seed."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # the sampled token's, for rows that asked
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Order of work: min_tokens masking, penalties, then greedy rows take the argmax and the
    others go through temperature, top-k, top-p and min-p before a draw. Logprobs are those
    of the raw logits, as vLLM reports by default."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: tuple[int, ...]) -> SamplerOutput:
        raw = logits
        logits = self._mask_stops_before_min_tokens(logits, rows, eos_token_ids)
        logits = self._apply_penalties(logits, rows)
        tokens = self._choose(logits, rows)
        logprobs, top = self._logprobs(raw, rows, tokens)
        return SamplerOutput(tokens.tolist(), logprobs, top)

    @staticmethod
    def _mask_stops_before_min_tokens(logits, rows, eos_token_ids):
        blocked = [
            (i, list(eos_token_ids) + r.params.stop_token_ids)
            for i, r in enumerate(rows)
            if len(r.output_token_ids) < r.params.min_tokens
        ]
        if not blocked:
            return logits
        logits = logits.clone()
        for i, ids in blocked:
            logits[i, ids] = float("-inf")
        return logits

    @staticmethod
    def _apply_penalties(logits, rows):
        penalized = [
            i for i, r in enumerate(rows)
            if r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
        ]
        if not penalized:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in penalized:
            p = rows[i].params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                seen[torch.tensor(rows[i].prompt_token_ids + rows[i].output_token_ids, device=logits.device)] = True
                scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(seen, scaled, row))
            if rows[i].output_token_ids and (p.presence_penalty or p.frequency_penalty):
                counts = torch.bincount(
                    torch.tensor(rows[i].output_token_ids, device=logits.device), minlength=vocab
                ).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    def _choose(self, logits, rows) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            probs = self._filtered_probs(logits[index], [rows[i].params for i in sampled])
            tokens[index] = self._draw(probs, [rows[i].generator for i in sampled])
        return tokens

    @staticmethod
    def _filtered_probs(logits, params: list[SamplingParams]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
        vocab = logits.shape[1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        min_p = torch.tensor([p.min_p for p in params], device=device)
        if (top_k < vocab).any() or (top_p < 1).any():
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=device)
            drop = ranks[None, :] >= top_k[:, None]
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Keep the smallest head of the distribution whose mass reaches top_p.
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop |= mass_before >= top_p[:, None]
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1)
        if (min_p > 0).any():
            floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs

    @staticmethod
    def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """argmax(p / q) with q ~ Exp(1) draws from p. Seeded rows take their noise from their
        own generator, so their draws do not depend on the rest of the batch."""
        noise = torch.empty_like(probs).exponential_()
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=generator).to(probs.device)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw, rows, tokens):
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        chosen: list[float | None] = [None] * len(rows)
        top: list[list[tuple[int, float]] | None] = [None] * len(rows)
        if not wanted:
            return chosen, top
        index = torch.tensor(wanted, device=raw.device)
        logprobs = raw[index].log_softmax(dim=-1)
        picked = logprobs.gather(1, tokens[index][:, None]).squeeze(1).tolist()
        most = max(rows[i].params.logprobs for i in wanted)
        values, ids = logprobs.topk(most, dim=-1) if most else (None, None)
        for k, i in enumerate(wanted):
            chosen[i] = picked[k]
            n = rows[i].params.logprobs
            top[i] = list(zip(ids[k, :n].tolist(), values[k, :n].tolist())) if n else []
        return chosen, top
