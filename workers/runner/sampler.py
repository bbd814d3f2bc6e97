"""Turns one step's logits into the next token of every sampling sequence, in one batch.

Order of work, per row: stop tokens are masked until `min_tokens`; repetition, frequency and
presence penalties; then greedy rows take the argmax, and the others go through temperature,
top-k, top-p and min-p before a draw. Each of these stages is a fixed number of tensor
operations over all the rows that draw, whatever the batch: a row that does not use a stage
gets the value that leaves it unchanged, and a stage that no row uses is skipped. Logprobs are
those of the raw logits, as vLLM reports by default.

Nothing sorts the vocabulary. A row with top-k keeps the tokens whose logit is at least a floor
(top-k's, raised by top-p's within what top-k keeps and by min-p's), found among its k + 1
largest logits (one `topk` for those rows); it sorts its row only when ties with its k-th logit
run past them. A row without top-k applies min-p as a floor under its largest logit and draws
top-p by rejection: a token drawn outside the nucleus is drawn again from the tokens more
likely than it, which leaves the nucleus' distribution exact.

A draw is inverse transform sampling over the kept tokens in vocabulary order, with one uniform
number per row. A seeded row's number is a hash of its seed and the index of the output token
being drawn, so its token depends on nothing but its seed, that index and its logits: not on
the rest of the batch, its place in it, or how often the sequence was preempted and recomputed.
The other rows' numbers come from torch's default generator.
"""

import math
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from kvserve.workers.engine.executor import SamplerOutput, TokenMasks
from kvserve.workers.engine.structured_output import apply_token_bitmask
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.runner.transfer import to_device

_NEG_INF = float("-inf")

# A row without top-k draws top-p by rejection: a draw whose token lies outside the nucleus is
# drawn again from the tokens more likely than it. Rows still unsettled after this many
# rounds (next to never) find their nucleus by sorting.
MAX_NUCLEUS_ROUNDS = 8

# The draw from a whole row picks a block of this many consecutive tokens, then a token in it.
_BLOCK = 128

# A draw's uniform number u has 52 random bits, so u <= _MAX_UNIFORM: then in float64 u * x < x
# for every x > 0, and a draw never lands past the last token that has any weight.
_UNIFORM_BITS = 52
_MAX_UNIFORM = 1.0 - 2.0**-_UNIFORM_BITS
_MASK32 = np.uint64(0xFFFF_FFFF)  # the seeded hash mixes 32-bit words, held in uint64

# Per token occurrence: its logits row, the token, and the index of its row's params.
_Occurrences = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class SamplingRow:
    """One sequence that samples: its prompt then output tokens (the sequence's own list, not a
    copy: most rows never look at it), and the sample's seed when its request has one. Token ids
    are below the vocabulary size (the width of the logits), as the engine checks. What the
    sampler needs to know of the params is worked out once, here: the runner keeps a sequence's
    row from step to step."""

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    seed: int | None = None
    draws: bool = field(init=False)  # not greedy
    penalized: bool = field(init=False)
    # What a draw uses: temperature, top_k (0: off), top_p (inf: off), min_p, whether any of the
    # last three filters, the seed (0 when none) and whether there is one.
    draw_settings: tuple[float, int, float, float, bool, int, bool] = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.draws = not p.greedy
        self.penalized = p.uses_penalties
        top_k = max(p.top_k, 0)
        # top_p 1.0 is off as well: the mass of a whole row may round to just below 1.
        top_p = p.top_p if p.top_p < 1.0 else math.inf
        filtered = bool(top_k) or top_p < 1.0 or p.min_p > 0.0
        self.draw_settings = (p.temperature, top_k, top_p, p.min_p, filtered, self.seed or 0, self.seed is not None)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(slots=True)
class _Draws:
    """The rows that draw a token and their settings, one entry per draw. A stage a row does not
    use gets the value that leaves it unchanged (temperature 1.0, top_k 0, top_p inf, min_p
    0.0), so that each stage runs on all the draws at once."""

    rows: list[int] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    filtered: list[bool] = field(default_factory=list)  # by top-k, top-p or min-p
    seeds: list[int] = field(default_factory=list)  # 0 where unseeded
    seeded: list[bool] = field(default_factory=list)
    counters: list[int] = field(default_factory=list)  # the index of the output token drawn

    @classmethod
    def of(cls, row_numbers: list[int], rows: list[SamplingRow], vocab: int,
           ahead: list[int] | None = None) -> "_Draws":
        """The draws of `rows` (those numbered `row_numbers`): one pass to transpose their settings.
        `ahead[k]`: how many output tokens past its row's draw k is (speculative positions)."""
        if not rows:
            return cls()
        temperature, top_k, top_p, min_p, filtered, seeds, seeded = map(list, zip(*(r.draw_settings for r in rows)))
        if max(top_k) >= vocab:  # top-k over the whole vocabulary filters nothing
            top_k = [k if k < vocab else 0 for k in top_k]
            filtered = [bool(k) or q < 1.0 or m > 0.0 for k, q, m in zip(top_k, top_p, min_p)]
        counters = [len(row.token_ids) - row.num_prompt_tokens for row in rows]
        if ahead is not None:
            counters = [c + a for c, a in zip(counters, ahead)]
        return cls(row_numbers, temperature, top_k, top_p, min_p, filtered, seeds, seeded, counters)

    def window(self, vocab: int) -> int:
        """How many of the largest logits the top-k rows look at: k + 1, to tell whether ties
        with their k-th logit run past the window."""
        return min(max(self.top_k) + 1, vocab)

    def subset(self, positions: list[int]) -> "_Draws":
        """The draws at `positions`, their rows renumbered 0, 1, ... in that order."""
        part = _Draws(rows=list(range(len(positions))))
        for name in ("temperature", "top_k", "top_p", "min_p", "filtered", "seeds", "seeded", "counters"):
            values = getattr(self, name)
            setattr(part, name, [values[i] for i in positions])
        return part


@dataclass(slots=True)
class _Plan:
    """Which rows need which stage this step, and the settings of the draws."""

    min_tokens: list[int] = field(default_factory=list)
    penalties: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)
    draws: _Draws = field(default_factory=_Draws)

    @classmethod
    def of(cls, rows: list[SamplingRow], vocab: int, draft_positions: list[int] | None = None) -> "_Plan":
        drawing = [i for i, row in enumerate(rows) if row.draws]
        ahead = [draft_positions[i] for i in drawing] if draft_positions is not None else None
        return cls(
            min_tokens=[i for i, row in enumerate(rows) if row.params.min_tokens
                        and len(row.token_ids) - row.num_prompt_tokens < row.params.min_tokens],
            penalties=[i for i, row in enumerate(rows) if row.penalized],
            logprobs=[i for i, row in enumerate(rows) if row.params.logprobs is not None],
            draws=_Draws.of(drawing, [rows[i] for i in drawing], vocab, ahead),
        )


@dataclass
class SampledTokens:
    """A step's sampled tokens, and the logprobs asked for, still on the device: nothing has
    waited for them. `output` reads them on the host."""

    token_ids: torch.Tensor  # [rows]
    rows: list[SamplingRow]
    logprob_rows: list[int]  # the rows that asked for logprobs
    sampled_logprobs: torch.Tensor | None = None  # [len(logprob_rows)]: the sampled token's
    top_values: torch.Tensor | None = None  # [len(logprob_rows), most asked for], most likely first
    top_ids: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # the step's pooled embedding rows, if any

    @classmethod
    def pooled_only(cls, pooled: torch.Tensor) -> "SampledTokens":
        """A step that pools and samples nothing."""
        return cls(torch.empty(0, dtype=torch.long), [], [], pooled=pooled)

    def output(self) -> SamplerOutput:
        token_ids = self.token_ids.tolist()
        chosen: list[float | None] = [None] * len(self.rows)
        top: list[list[tuple[int, float]] | None] = [None] * len(self.rows)
        if self.logprob_rows:
            values, ids = self.top_values.tolist(), self.top_ids.tolist()
            for k, (i, logprob) in enumerate(zip(self.logprob_rows, self.sampled_logprobs.tolist())):
                n = self.rows[i].params.logprobs
                chosen[i] = logprob
                top[i] = list(zip(ids[k][:n], values[k][:n]))
        pooled = self.pooled.cpu() if self.pooled is not None else None
        return SamplerOutput(token_ids, chosen, top, pooled)


class Sampler:
    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: tuple[int, ...] = ()
    ) -> SamplerOutput:
        return self.sample(logits, rows, eos_token_ids).output()

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        eos_token_ids: tuple[int, ...] = (),
        token_masks: TokenMasks | None = None,
        draft_positions: list[int] | None = None,
    ) -> SampledTokens:
        """`logits` is [len(rows), vocab] and is used as scratch space: it is changed in place.
        `eos_token_ids` are the model's end tokens, masked with `params.stop_token_ids` while
        a row has fewer than `params.min_tokens` outputs (even with `ignore_eos`). The rows of
        `token_masks` (structured outputs) keep only their allowed tokens, before anything
        else, logprobs included. A row at `draft_positions[i]` = j > 0 (speculative decoding;
        the same `SamplingRow` as the j rows before it) draws the output token j past its row's,
        with that token's seeded number."""
        if token_masks is not None:
            apply_token_bitmask(logits, token_masks.bitmask, token_masks.rows)
        plan = _Plan.of(rows, logits.shape[1], draft_positions)
        raw_logprobs = None
        if plan.logprobs:  # taken before anything below changes the logits
            wanted = logits if len(plan.logprobs) == len(rows) else logits[_index(plan.logprobs, logits)]
            raw_logprobs = wanted.log_softmax(dim=-1)
        if plan.min_tokens:
            _mask_stop_tokens(logits, rows, plan.min_tokens, eos_token_ids)
        if plan.penalties:
            _apply_penalties(logits, rows, plan.penalties)
        sampled = SampledTokens(_choose(logits, plan.draws), rows, plan.logprobs)
        if raw_logprobs is not None:
            _add_logprobs(sampled, raw_logprobs)
        return sampled


def _index(row_numbers: list[int], like: torch.Tensor) -> torch.Tensor:
    return to_device(row_numbers, torch.long, like.device)


def _choose(logits: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """Greedy rows take the argmax; the others draw."""
    if draws.rows and len(draws.rows) == logits.shape[0]:
        return _sample(logits, draws)
    tokens = _argmax(logits)
    if draws.rows:
        index = _index(draws.rows, logits)
        tokens[index] = _sample(logits[index], draws)
    return tokens


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """The first largest logit of each row. On the CPU numpy's argmax, which is vectorised where
    torch's is not (about a tenth of the time over a [256, 512] float32 batch)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


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


def _sample(logits: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """One token per row of `logits` (changed in place) from its filtered distribution: rows
    with top-k find their kept set among their largest logits, the others draw from their
    whole row."""
    if any(t != 1.0 for t in draws.temperature):
        logits.div_(_column(draws.temperature, logits))
    with_top_k = [i for i, k in enumerate(draws.top_k) if k]
    if not with_top_k:
        return _sample_whole_rows(logits, draws)
    if len(with_top_k) == len(draws.rows):
        return _sample_top_k(logits, draws)
    without = [i for i, k in enumerate(draws.top_k) if not k]
    tokens = torch.empty(len(draws.rows), dtype=torch.long, device=logits.device)
    for positions, sample in ((with_top_k, _sample_top_k), (without, _sample_whole_rows)):
        index = _index(positions, logits)
        tokens[index] = sample(logits[index], draws.subset(positions))
    return tokens


def _sample_top_k(logits: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """Rows with top-k: their kept set (top-k, then top-p and min-p within it) lies among their
    k + 1 largest logits, unless ties with the k-th run past them."""
    uniforms = _uniforms(draws, logits.device)[0]
    width = draws.window(logits.shape[1])
    values, ids = logits.topk(width, dim=-1)
    floor = _floor(logits, values, draws)
    tokens = _draw_in_window(values, ids, floor, uniforms)
    if width < logits.shape[1]:
        _redraw_past_window(tokens, logits, values, floor, uniforms, draws)
    return tokens


def _sample_whole_rows(logits: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """Rows without top-k: min-p is a floor under the largest logit, top-p is drawn by rejection
    (`_draw_nucleus`); nothing is sorted."""
    if any(draws.min_p):
        # p >= min_p * p_max in logit space; log(0) = -inf leaves a row without min-p as it is.
        floor = logits.amax(dim=-1, keepdim=True) + _column(draws.min_p, logits).log_()
        logits.masked_fill_(logits < floor, _NEG_INF)
    if any(p < 1.0 for p in draws.top_p):
        return _draw_nucleus(logits, draws)
    return _draw(logits, _uniforms(draws, logits.device)[0])


def _draw_nucleus(logits: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """Top-p by rejection. A token belongs to the nucleus when the mass of the tokens strictly
    more likely than it is below top_p (which keeps the token where the mass reaches top_p,
    its ties, and always the most likely token). Each round draws from the candidates; a token
    outside the nucleus rules out itself and every token no more likely than it, so the row's
    next round draws from the tokens more likely than it. A draw is kept once it is in the
    nucleus: conditioned on that, it follows the nucleus' renormalised distribution. `logits`
    hold -inf where min-p filtered; top-p's mass is over the row before min-p, as when top-p is
    applied first."""
    probs = logits.softmax(dim=-1)
    weights = probs.masked_fill(logits == _NEG_INF, 0.0) if any(draws.min_p) else probs.clone()
    top_p = _column(draws.top_p, logits)  # inf where a row has no top-p: its first draw is kept
    uniforms = _uniforms(draws, logits.device, MAX_NUCLEUS_ROUNDS + 1)
    tokens = torch.empty(len(draws.rows), dtype=torch.long, device=logits.device)
    active = torch.arange(len(draws.rows), device=logits.device)
    for round_number in range(MAX_NUCLEUS_ROUNDS):
        everyone = round_number == 0
        row_probs = probs if everyone else probs[active]
        row_uniforms = uniforms[round_number] if everyone else uniforms[round_number, active]
        drawn = _draw_weights(weights if everyone else weights[active], row_uniforms)
        drawn_prob = row_probs.gather(1, drawn[:, None])
        above = row_probs.mul(row_probs > drawn_prob).sum(dim=-1, keepdim=True)  # (faster than where)
        kept = (above < top_p[active]).squeeze(1)
        tokens[active[kept]] = drawn[kept]
        rejected = active[~kept]
        if not len(rejected):  # a host sync
            return tokens
        weights[rejected] = weights[rejected].masked_fill(probs[rejected] <= drawn_prob[~kept], 0.0)
        active = rejected
    tokens[active] = _sorted_nucleus_draw(weights[active], probs[active], top_p[active],
                                          uniforms[MAX_NUCLEUS_ROUNDS, active])
    return tokens


def _sorted_nucleus_draw(weights: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor,
                         uniforms: torch.Tensor) -> torch.Tensor:
    """The nucleus found by sorting the row, for rows that rejection did not settle."""
    descending = probs.sort(dim=-1, descending=True).values
    mass_above = descending.cumsum(dim=-1) - descending
    smallest_kept = descending.masked_fill(mass_above >= top_p, math.inf).amin(dim=-1, keepdim=True)
    weights.masked_fill_(probs < smallest_kept, 0.0)
    return _draw_weights(weights, uniforms)


def _floor(logits: torch.Tensor, values: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """The smallest logit each row keeps: top-k's (ties with the k-th largest kept too), raised
    by top-p's over what top-k keeps, and by min-p's; -inf for a row that filters nothing.
    `values` are the largest logits of each row, in descending order."""
    width = values.shape[1]
    floor = _at(values, _index([k - 1 if k else width for k in draws.top_k], logits)[:, None])
    if any(p < 1.0 for p in draws.top_p):
        floor = torch.maximum(floor, _top_p_floor(logits, values, floor, draws))
    if any(draws.min_p):
        # p >= min_p * p_max in logit space; log(0) = -inf leaves a row without min-p as it is.
        floor = torch.maximum(floor, values[:, :1] + _column(draws.min_p, logits).log_())
    return floor


def _top_p_floor(
    logits: torch.Tensor, values: torch.Tensor, kth: torch.Tensor, draws: _Draws
) -> torch.Tensor:
    """Top-p keeps the smallest set of most likely tokens whose mass, under what top-k kept
    (logits >= kth), reaches top_p: every token at least as likely as the one at which the mass
    reaches it (ties with it included, and always the most likely token). The largest `values`
    hold that set except in a row whose top-k ties run past them: those sort their row."""
    top_p = _column(draws.top_p, logits)
    kept = values.masked_fill(values < kth, _NEG_INF)
    floor = _nucleus_floor(kept, kept.logsumexp(dim=-1, keepdim=True), top_p)
    if values.shape[1] < logits.shape[1]:
        unsettled = (top_p < 1.0) & (kth == values[:, -1:])
        rows = unsettled.squeeze(1).nonzero().squeeze(1)  # a host sync
        if len(rows):
            descending = logits[rows].sort(dim=-1, descending=True).values
            descending.masked_fill_(descending < kth[rows], _NEG_INF)
            floor[rows] = _nucleus_floor(descending, descending.logsumexp(dim=-1, keepdim=True), top_p[rows])
    return floor


def _nucleus_floor(descending: torch.Tensor, log_total: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The logit at which the mass of the tokens of `descending`, most likely first, reaches
    top_p; -inf (no floor) where it stays below."""
    mass = (descending - log_total).exp_().cumsum_(dim=-1)
    return _at(descending, (mass < top_p).sum(dim=-1, keepdim=True))


def _at(descending: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """descending[row, index[row]], or -inf where the index is one past the last column."""
    return F.pad(descending, (0, 1), value=_NEG_INF).gather(1, index)


def _draw_in_window(
    values: torch.Tensor, ids: torch.Tensor, floor: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """The draw among the tokens of the window (`values` at `ids`) at or above the floor: the
    inverse transform of `_draw`, over the same tokens in the same (vocabulary) order, so that a
    row draws the same token (up to rounding) from a window of any width or from its whole row."""
    top = values[:, :1]
    ids, order = ids.sort(dim=-1)
    values = values.gather(1, order)
    weights = (values - top).exp_().masked_fill_(values < floor, 0.0)
    cumulative = weights.double().cumsum_(dim=-1)
    chosen = torch.searchsorted(cumulative, uniforms[:, None] * cumulative[:, -1:], right=True)
    return ids.gather(1, chosen).squeeze(1)


def _redraw_past_window(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    floor: torch.Tensor,
    uniforms: torch.Tensor,
    draws: _Draws,
) -> None:
    """Rows that may keep a token past the window (no filter, or a wide one) draw again, from
    their whole row."""
    wide = (floor <= values[:, -1:]).squeeze(1).nonzero().squeeze(1)  # a host sync
    if not len(wide):
        return
    wide_logits = logits if len(wide) == len(logits) else logits[wide]
    if any(draws.filtered[i] for i in wide.tolist()):
        wide_logits.masked_fill_(wide_logits < floor[wide], _NEG_INF)
    tokens[wide] = _draw(wide_logits, uniforms[wide])


def _draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse transform sampling in two levels, so that no running sum over the whole vocabulary
    is needed: u picks a block of _BLOCK tokens by the blocks' cumulative weight, then where u
    fell within that block's share picks a token by the block's own cumulative weight. Running
    sums are in float64, so rounding moves no noticeable mass between tokens; and both fractions
    stay below 1, so a token of weight 0 (masked, or padding) is never drawn. `logits` is
    changed into the weights."""
    return _draw_weights(logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_(), uniforms)


def _draw_weights(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """`_draw` over weights >= 0 (at least one positive per row) instead of logits."""
    if weights.shape[1] % _BLOCK:
        weights = F.pad(weights, (0, -weights.shape[1] % _BLOCK))
    block_weights = weights.reshape(weights.shape[0], -1, _BLOCK).sum(dim=-1)
    # The weight before each block, then the total.
    edges = F.pad(block_weights.double().cumsum_(dim=-1), (1, 0))
    target = uniforms[:, None] * edges[:, -1:]
    block = torch.searchsorted(edges, target, right=True) - 1  # edges[block] <= target < edges[block + 1]
    low, high = edges.gather(1, block), edges.gather(1, block + 1)
    fraction = ((target - low) / (high - low)).clamp_max_(_MAX_UNIFORM)
    first = block * _BLOCK
    in_block = weights.gather(1, first + torch.arange(_BLOCK, device=weights.device)).double().cumsum_(dim=-1)
    return (first + torch.searchsorted(in_block, fraction * in_block[:, -1:], right=True)).squeeze(1)


def _uniforms(draws: _Draws, device: torch.device, rounds: int = 1) -> torch.Tensor:
    """[rounds, draws] numbers in [0, 1) with 52 random bits, on `device`: row j is for round j of
    a draw (top-p's rejection may draw again). A seeded draw's numbers are a hash of its seed, its
    counter and the round; the others come from one call to torch's default generator. The
    hashing runs in numpy: a handful of operations on a few hundred integers, where each torch
    call would cost more than its work."""
    shape = (rounds, len(draws.rows))
    if not any(draws.seeded):
        bits = torch.randint(1 << _UNIFORM_BITS, shape).numpy()
    else:
        counters = np.asarray(draws.counters, dtype=np.int64) * (MAX_NUCLEUS_ROUNDS + 1)
        rounds_drawn = np.arange(rounds, dtype=np.int64)[:, None]
        bits = _hash_bits(np.asarray(draws.seeds, dtype=np.int64), counters + rounds_drawn).astype(np.int64)
        if not all(draws.seeded):
            bits = np.where(draws.seeded, bits, torch.randint(1 << _UNIFORM_BITS, shape).numpy())
    return to_device(bits * 2.0**-_UNIFORM_BITS, torch.float64, device)


def _hash_bits(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """52 bits that depend on (seed, counter) alone: the 32-bit words 2 * counter and
    2 * counter + 1 of the seed's stream, each mixed with the low then the high half of the
    seed (its two's complement bits), give 32 and 20 bits."""
    counters = counters.astype(np.uint64)
    seeds = seeds.view(np.uint64)
    low = _mix32((counters * 2) & _MASK32)
    high = _mix32((counters * 2 + 1) & _MASK32)
    for word in (seeds & _MASK32, seeds >> np.uint64(32)):
        low, high = _mix32(low ^ word), _mix32(high ^ word)
    return (low << np.uint64(20)) | (high >> np.uint64(12))


def _mix32(x: np.ndarray) -> np.ndarray:
    """A bijective mix of 32-bit values held in uint64 (the two-round "prospector32" of Chris
    Wellons' hash-prospector); no product reaches 2^64."""
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x2C1B3C6D)) & _MASK32
    x = x ^ (x >> np.uint64(12))
    x = (x * np.uint64(0x297A2D39)) & _MASK32
    return x ^ (x >> np.uint64(15))


def _add_logprobs(sampled: SampledTokens, raw_logprobs: torch.Tensor) -> None:
    """The sampled token's raw logprob and the most likely ones, for the rows that asked."""
    rows, wanted = sampled.rows, sampled.logprob_rows
    tokens = sampled.token_ids if len(wanted) == len(rows) else sampled.token_ids[_index(wanted, raw_logprobs)]
    sampled.sampled_logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    most = max(rows[i].params.logprobs for i in wanted)
    sampled.top_values, sampled.top_ids = raw_logprobs.topk(most, dim=-1)
