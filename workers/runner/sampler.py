"""Turns one step's logits into the next token of every sampling sequence, in one batch.

Order of work, per row: stop tokens are masked until `min_tokens`; repetition, frequency and
presence penalties; then greedy rows take the argmax, and the others go through temperature,
top-k, top-p and min-p before a draw. Each stage runs only when some row uses it, on those rows
only, vectorized over them. Logprobs are those of the raw logits, as vLLM reports by default.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

import torch

from kvserve.workers.engine.executor import SamplerOutput
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.runner.transfer import to_device

_NEG_INF = float("-inf")

# Per token occurrence: its logits row, the token, and the index of its row's params.
_Occurrences = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class SamplingRow:
    """One sequence that samples this step: its prompt then output tokens (the sequence's own
    list, not a copy: most rows never look at it), and a generator when the request has a seed.
    Token ids are below the vocabulary size (the width of the logits), as the engine checks."""

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    generator: torch.Generator | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(slots=True)
class _Plan:
    """Which rows need which stage this step; found in one pass over the rows."""

    min_tokens: list[int] = field(default_factory=list)
    penalties: list[int] = field(default_factory=list)
    random: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, rows: list[SamplingRow]) -> "_Plan":
        plan = cls()
        for i, row in enumerate(rows):
            params = row.params
            if row.num_output_tokens < params.min_tokens:
                plan.min_tokens.append(i)
            if params.uses_penalties:
                plan.penalties.append(i)
            if not params.greedy:
                plan.random.append(i)
            if params.logprobs is not None:
                plan.logprobs.append(i)
        return plan


class Sampler:
    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: tuple[int, ...] = ()
    ) -> SamplerOutput:
        """`logits` is [len(rows), vocab] and is used as scratch space: it is changed in place.
        `eos_token_ids` are the model's end tokens, masked with `params.stop_token_ids` while
        a row has fewer than `params.min_tokens` outputs (even with `ignore_eos`)."""
        plan = _Plan.of(rows)
        raw_logprobs = None
        if plan.logprobs:  # taken before anything below changes the logits
            raw_logprobs = logits[_index(plan.logprobs, logits)].log_softmax(dim=-1)
        if plan.min_tokens:
            _mask_stop_tokens(logits, rows, plan.min_tokens, eos_token_ids)
        if plan.penalties:
            _apply_penalties(logits, rows, plan.penalties)
        token_ids = _choose(logits, rows, plan.random).tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_ids, [None] * len(rows), [None] * len(rows))
        return SamplerOutput(token_ids, *_report_logprobs(raw_logprobs, token_ids, rows, plan.logprobs))


def _index(row_numbers: list[int], like: torch.Tensor) -> torch.Tensor:
    return to_device(row_numbers, torch.long, like.device)


def _choose(logits: torch.Tensor, rows: list[SamplingRow], random: list[int]) -> torch.Tensor:
    """Greedy rows take the argmax; the `random` ones draw."""
    if random and len(random) == len(rows):
        return _sample(logits, rows)
    tokens = logits.argmax(dim=-1)
    if random:
        index = _index(random, logits)
        tokens[index] = _sample(logits[index], [rows[i] for i in random])
    return tokens


def _mask_stop_tokens(
    logits: torch.Tensor, rows: list[SamplingRow], blocked: list[int], eos_token_ids: tuple[int, ...]
) -> None:
    vocab = logits.shape[1]
    pairs = [
        (i, token)
        for i in blocked
        for token in chain(eos_token_ids, rows[i].params.stop_token_ids)
        if token < vocab
    ]
    if pairs:
        row_of, token_of = zip(*pairs)
        logits[_index(row_of, logits), _index(token_of, logits)] = _NEG_INF


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], penalized: list[int]) -> None:
    """As in vLLM: repetition over prompt and output, then frequency and presence over the
    output only. Only the (row, token) pairs that occur are touched, not whole vocabulary
    rows. Rows without a penalty of a kind contribute no tokens to it."""
    params = [rows[i].params for i in penalized]
    contexts = [
        rows[i].token_ids if p.repetition_penalty != 1.0 else []
        for i, p in zip(penalized, params)
    ]
    outputs = [
        rows[i].output_token_ids if p.frequency_penalty or p.presence_penalty else []
        for i, p in zip(penalized, params)
    ]
    _apply_repetition_penalty(logits, _occurrences(logits, penalized, contexts), params)
    _apply_output_penalties(logits, _occurrences(logits, penalized, outputs), params)


def _apply_repetition_penalty(
    logits: torch.Tensor, occurrences: _Occurrences, params: list[SamplingParams]
) -> None:
    """Positive logits divided by the penalty, negative ones multiplied. A token seen several
    times is read before any write, so each write of it stores the same value."""
    row_of, token, which = occurrences
    factor = _values([p.repetition_penalty for p in params], logits)[which]
    values = logits[row_of, token]
    logits[row_of, token] = torch.where(values > 0, values / factor, values * factor)


def _apply_output_penalties(
    logits: torch.Tensor, occurrences: _Occurrences, params: list[SamplingParams]
) -> None:
    """Frequency once per occurrence (accumulated), presence once per distinct token (the same
    read-then-write as the repetition penalty)."""
    row_of, token, which = occurrences
    frequency = _values([p.frequency_penalty for p in params], logits)[which]
    logits.index_put_((row_of, token), -frequency, accumulate=True)
    presence = _values([p.presence_penalty for p in params], logits)[which]
    logits[row_of, token] = logits[row_of, token] - presence


def _occurrences(logits: torch.Tensor, row_numbers: list[int], token_lists: list[list[int]]) -> _Occurrences:
    """Every token of every list; token_lists[k] belongs to logits row row_numbers[k]."""
    lengths = torch.tensor([len(tokens) for tokens in token_lists])
    which = to_device(torch.repeat_interleave(torch.arange(len(token_lists)), lengths), torch.long, logits.device)
    tokens = to_device(list(chain.from_iterable(token_lists)), torch.long, logits.device)
    return _index(row_numbers, logits)[which], tokens, which


def _values(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.dtype, like.device)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return _values(values, like)[:, None]


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One token per row of `logits` (changed in place) from its filtered distribution."""
    params = [row.params for row in rows]
    if any(p.temperature != 1.0 for p in params):
        logits.div_(_column([p.temperature for p in params], logits))
    vocab = logits.shape[1]
    _filter_rows(logits, [p.top_k if 0 < p.top_k < vocab else 0 for p in params], 0, _keep_top_k)
    _filter_rows(logits, [p.top_p for p in params], 1.0, _keep_top_p)
    _filter_rows(logits, [p.min_p for p in params], 0.0, _keep_min_p)
    probs = logits.softmax(dim=-1)
    return probs.div_(_exponential_noise(probs, [row.generator for row in rows])).argmax(dim=-1)


def _filter_rows(
    logits: torch.Tensor,
    values: list[float],
    off: float,
    keep: Callable[[torch.Tensor, list[float]], None],
) -> None:
    """Run the in-place filter `keep(logits of some rows, their values)` on the rows whose
    value is not `off`, leaving the other rows as they are."""
    used = [i for i, value in enumerate(values) if value != off]
    if len(used) == len(values):
        keep(logits, values)
    elif used:
        index = _index(used, logits)
        chosen = logits[index]
        keep(chosen, [values[i] for i in used])
        logits[index] = chosen


def _keep_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Ties with the k-th largest logit are kept too."""
    largest = logits.topk(max(top_k), dim=-1).values
    kth = largest.gather(1, _index([k - 1 for k in top_k], logits)[:, None])
    logits.masked_fill_(logits < kth, _NEG_INF)


def _keep_top_p(logits: torch.Tensor, top_p: list[float]) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, and always the
    most likely one. Going up from the least likely, a token is dropped while the mass up to
    and including it is at most 1 - top_p."""
    ascending, order = logits.sort(dim=-1)
    mass_up_to = ascending.softmax(dim=-1).cumsum_(dim=-1)
    drop = mass_up_to <= 1.0 - _column(top_p, logits)
    drop[:, -1] = False
    logits.scatter_(1, order, ascending.masked_fill_(drop, _NEG_INF))


def _keep_min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    """p >= min_p * p_max, in logit space: logit >= max logit + log(min_p)."""
    floor = logits.amax(dim=-1, keepdim=True) + _column([math.log(p) for p in min_p], logits)
    logits.masked_fill_(logits < floor, _NEG_INF)


def _exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """q ~ Exp(1) per entry, so that argmax(probs / q) draws from probs. Seeded rows take
    theirs from their own generator, so their draws do not depend on the rest of the batch;
    the others share one batched draw."""
    noise = torch.empty_like(probs)
    if any(generator is None for generator in generators):
        noise.exponential_()
    vocab = probs.shape[1]
    for i, generator in enumerate(generators):
        if generator is not None:
            draw = torch.empty(vocab, dtype=probs.dtype, device=generator.device).exponential_(generator=generator)
            noise[i] = to_device(draw, probs.dtype, probs.device)
    # A zero draw would turn a filtered token's 0 / 0 into NaN, which argmax would pick.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _report_logprobs(
    raw_logprobs: torch.Tensor, token_ids: list[int], rows: list[SamplingRow], wanted: list[int]
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """The sampled token's raw logprob and the top-N, for the `wanted` rows, by row."""
    sampled = raw_logprobs.gather(1, _index([token_ids[i] for i in wanted], raw_logprobs)[:, None])
    chosen: list[float | None] = [None] * len(rows)
    top: list[list[tuple[int, float]] | None] = [None] * len(rows)
    most = max(rows[i].params.logprobs for i in wanted)
    values, ids = raw_logprobs.topk(most, dim=-1)
    values, ids = values.tolist(), ids.tolist()
    for k, (i, logprob) in enumerate(zip(wanted, sampled.squeeze(1).tolist())):
        n = rows[i].params.logprobs
        chosen[i] = logprob
        top[i] = list(zip(ids[k][:n], values[k][:n]))
    return chosen, top
