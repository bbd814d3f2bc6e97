"""Turns one step's logits into the next token of every sampling sequence, in one batch.

Order of work, per row: tokens outside `allowed_token_ids` are masked, the last token of each
bad word whose other tokens end the output, and stop tokens until `min_tokens`; `logit_bias`
is added; repetition, frequency and presence penalties; a row whose thinking has used its
budget can take only the token that ends it; then greedy rows take the argmax, and
the others go through temperature, top-k, top-p and min-p before a draw. Each of these stages is a fixed number of tensor
operations over all the rows that draw, whatever the batch: a row that does not use a stage
gets the value that leaves it unchanged, and a stage that no row uses is skipped. Logprobs are
those of the raw logits, as vLLM reports by default. The sampler keeps the plan of a batch of
rows (who needs which stage, their settings as tensors) for as long as the same rows come back.

Filters work on probabilities. A row with top-k keeps the tokens whose probability is at least
a floor (top-k's, raised by top-p's within what top-k keeps and by min-p's), found among its
k + 1 largest; it sorts its row only when ties with its k-th run past them. A row without top-k
applies min-p as a floor under its largest probability and draws top-p by rejection: a draw
outside the nucleus is drawn again from the nucleus, which only such rows sort to find.

A draw is inverse transform sampling over the kept tokens in vocabulary order, with one uniform
number per row (a second for top-p's rejected draws). A seeded row's numbers are a hash of its
seed and the index of the output token being drawn, so its token depends on nothing but its
seed, that index and its logits: not on the rest of the batch, its place in it, or how often the
sequence was preempted and recomputed. The other rows' numbers come from torch's default
generator.

On the CPU, where torch's per-operation cost is the step's cost, the work avoids what torch's
CPU build does slowly: sorts and argmax go through numpy, masks are arithmetic on floats rather
than boolean tensors, and weights come from `softmax` (whose exp is fast where the plain `exp`
of very negative or -inf logits is not).
"""

import math
import operator
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from kvserve.workers.engine.executor import NO_TOKEN, SamplerOutput, TokenMasks
from kvserve.workers.engine.structured_output import apply_token_bitmask
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.runner.prompt_logprobs import ScoredPrompts
from kvserve.workers.runner.transfer import to_device

_NEG_INF = float("-inf")

# The random numbers a seeded token may use: its draw's, top-p's second draw's, then those of
# speculative decoding (`rejection_sampling.Use`), each a stream of its own.
_UNIFORMS_PER_TOKEN = 5

# The draw from a whole row picks a block of this many consecutive tokens, then a token in it.
_BLOCK = 128

# A draw's uniform number u has 52 random bits, so u <= _MAX_UNIFORM: then in float64 u * x < x
# for every x > 0, and a draw never lands past the last token that has any weight.
_UNIFORM_BITS = 52
_MAX_UNIFORM = 1.0 - 2.0**-_UNIFORM_BITS
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's step between a stream's states

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
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences its output may not end with
    draws: bool = field(init=False)  # not greedy
    penalized: bool = field(init=False)
    thinking_over: bool = field(init=False)  # no thinking budget, or its thinking has ended
    # What a draw uses: temperature, top_k (0: off), top_p (inf: off), min_p, whether any of the
    # last three filters, the seed (0 when none) and whether there is one.
    draw_settings: tuple[float, int, float, float, bool, int, bool] = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.draws = not p.greedy
        self.penalized = p.uses_penalties
        self.thinking_over = p.thinking_budget is None
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

    def thinking_due(self) -> bool:
        """Whether its thinking has used up its budget without ending: the next token ends it.
        The output is searched for the end only from the budget on, and never once it is found;
        an output that may skip its thinking is looked at once it has a first token."""
        budget = self.params.thinking_budget
        if self.thinking_over:
            return False
        opener, thought = budget.opened_by_token_id, self.num_output_tokens
        if opener is not None:
            if not thought:
                return False
            if self.token_ids[self.num_prompt_tokens] != opener:
                self.thinking_over = True
                return False
            thought -= 1
        if thought < budget.max_tokens:
            return False
        self.thinking_over = budget.end_token_id in self.output_token_ids
        return not self.thinking_over


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
    # What follows from the settings (as tensors, which stages run) and the seeds' hashed
    # streams, made once for the steps that keep them.
    _columns: dict = field(default_factory=dict)
    _seed_streams: np.ndarray | None = None

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
        draws = cls(row_numbers, temperature, top_k, top_p, min_p, filtered, seeds, seeded)
        draws.count(rows, ahead)
        return draws

    def count(self, rows: list[SamplingRow], ahead: list[int] | None = None) -> None:
        """Each draw's counter from its row's output so far (`rows` are the drawing rows)."""
        self.counters = [len(row.token_ids) - row.num_prompt_tokens for row in rows]
        if ahead is not None:
            self.counters = [c + a for c, a in zip(self.counters, ahead)]

    def column(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A setting as a [draws, 1] tensor like `like`, not to be changed in place."""
        return self._kept((name, like.dtype, like.device), lambda: _column(getattr(self, name), like))

    def with_top_k(self) -> list[int]:
        """The positions of the draws with top-k."""
        return self._kept("with_top_k", lambda: [i for i, k in enumerate(self.top_k) if k])

    def with_top_p(self) -> list[int]:
        """The positions of the draws with top-p."""
        return self._kept("with_top_p", lambda: [i for i, p in enumerate(self.top_p) if p < 1.0])

    def uses(self, stage: str) -> bool:
        """Whether any draw scales by its temperature ("temperature"), has top-p, min-p, a seed
        ("seed") or none ("no_seed")."""
        return self._kept(stage, lambda: _STAGE_TESTS[stage](self))

    def _kept(self, key, make):
        """`make()`, worked out once for these settings."""
        if key not in self._columns:
            self._columns[key] = make()
        return self._columns[key]

    def seed_streams(self) -> np.ndarray:
        """Each draw's seed, hashed into the start of its stream of random numbers."""
        if self._seed_streams is None:
            self._seed_streams = seed_streams(self.seeds)
        return self._seed_streams

    def window(self, vocab: int, device: torch.device) -> int:
        """How many of the largest logits the top-k rows look at: k + 1, to tell whether ties
        with their k-th logit run past the window. With top-p on a device, the whole row:
        telling which rows' ties run past would wait for the step (a host sync), which holds
        back the scheduling of the next one."""
        if _sync_stalls(device) and self.uses("top_p"):
            return vocab
        return min(max(self.top_k) + 1, vocab)

    def subset(self, positions: list[int]) -> "_Draws":
        """The draws at `positions`, their rows renumbered 0, 1, ... in that order."""
        part = _Draws(rows=list(range(len(positions))))
        for name in ("temperature", "top_k", "top_p", "min_p", "filtered", "seeds", "seeded", "counters"):
            values = getattr(self, name)
            setattr(part, name, [values[i] for i in positions])
        return part


_STAGE_TESTS = {
    "temperature": lambda draws: any(t != 1.0 for t in draws.temperature),
    "top_p": lambda draws: any(p < 1.0 for p in draws.top_p),
    "min_p": lambda draws: any(draws.min_p),
    "seed": lambda draws: any(draws.seeded),
    "no_seed": lambda draws: not all(draws.seeded),
}


@dataclass(slots=True)
class _Plan:
    """Which rows need which stage, and the settings of the draws. A plan is worked out once for
    a list of rows and kept while the following steps sample the same rows (the sampler's part
    of a persistent batch): `refresh` updates what moves from step to step, the output counts."""

    rows: list[SamplingRow]
    vocab: int
    min_tokens: list[int] = field(default_factory=list)  # the rows still under their min_tokens
    thinking_ends: list[int] = field(default_factory=list)  # the rows whose thinking must end now
    biased: bool = False  # whether a row has a logit_bias
    restricted: bool = False  # whether a row has allowed_token_ids
    banning: list[int] = field(default_factory=list)  # the rows with bad words
    penalties: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)
    draws: _Draws = field(default_factory=_Draws)
    _biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # `biases`, once worked out
    _allowed: tuple[torch.Tensor, torch.Tensor] | None = None  # `allowed`, once worked out
    _with_min_tokens: list[int] = field(default_factory=list)
    _with_thinking_budget: list[int] = field(default_factory=list)
    _drawing_rows: list[SamplingRow] = field(default_factory=list)

    @classmethod
    def of(cls, rows: list[SamplingRow], vocab: int, draft_positions: list[int] | None = None) -> "_Plan":
        drawing = [i for i, row in enumerate(rows) if row.draws]
        drawing_rows = [rows[i] for i in drawing]
        ahead = [draft_positions[i] for i in drawing] if draft_positions is not None else None
        plan = cls(
            rows, vocab,
            biased=any(row.params.logit_bias for row in rows),
            restricted=any(row.params.allowed_token_ids is not None for row in rows),
            banning=[i for i, row in enumerate(rows) if row.bad_words],
            penalties=[i for i, row in enumerate(rows) if row.penalized],
            logprobs=[i for i, row in enumerate(rows) if row.params.logprobs is not None],
            draws=_Draws.of(drawing, drawing_rows, vocab, ahead),
            _with_min_tokens=[i for i, row in enumerate(rows) if row.params.min_tokens],
            _with_thinking_budget=[i for i, row in enumerate(rows) if not row.thinking_over],
            _drawing_rows=drawing_rows,
        )
        plan._count_output_tokens()
        return plan

    def holds(self, rows: list[SamplingRow], vocab: int) -> bool:
        """Whether this plan is for these very rows, in this order."""
        return vocab == self.vocab and len(rows) == len(self.rows) and all(map(operator.is_, rows, self.rows))

    def biases(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`logit_bias_entries` of the rows, worked out once per plan."""
        if self._biases is None:
            self._biases = logit_bias_entries([row.params for row in self.rows], like)
        return self._biases

    def allowed(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`allowed_token_masks` of the rows, worked out once per plan."""
        if self._allowed is None:
            self._allowed = allowed_token_masks([row.params for row in self.rows], like)
        return self._allowed

    def refresh(self) -> None:
        """Only seeded draws read their counters."""
        if self.draws.uses("seed"):
            self.draws.count(self._drawing_rows)
        self._count_output_tokens()

    def _count_output_tokens(self) -> None:
        rows = self.rows
        self.min_tokens = [i for i in self._with_min_tokens
                           if len(rows[i].token_ids) - rows[i].num_prompt_tokens < rows[i].params.min_tokens]
        if self._with_thinking_budget:
            self.thinking_ends = [i for i in self._with_thinking_budget if rows[i].thinking_due()]


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
    prompt_scores: ScoredPrompts | None = None  # the step's prompt logprobs, if any were asked for
    unusable: torch.Tensor | None = None  # [rows] bool: nothing to draw from (`_unusable_rows`)

    @classmethod
    def nothing_sampled(cls, pooled: torch.Tensor | None, prompt_scores: ScoredPrompts | None) -> "SampledTokens":
        """A step that samples nothing but pools or scores prompts."""
        return cls(torch.empty(0, dtype=torch.long), [], [], pooled=pooled, prompt_scores=prompt_scores)

    def output(self) -> SamplerOutput:
        token_ids = self.token_ids if self.unusable is None else self.token_ids.masked_fill(self.unusable, NO_TOKEN)
        token_ids = token_ids.tolist()
        chosen: list[float | None] = [None] * len(self.rows)
        top: list[list[tuple[int, float]] | None] = [None] * len(self.rows)
        if self.logprob_rows:
            values, ids = self.top_values.tolist(), self.top_ids.tolist()
            for k, (i, logprob) in enumerate(zip(self.logprob_rows, self.sampled_logprobs.tolist())):
                n = self.rows[i].params.logprobs
                chosen[i] = logprob
                top[i] = list(zip(ids[k][:n], values[k][:n]))
        pooled = self.pooled.cpu() if self.pooled is not None else None
        prompt_logprobs = self.prompt_scores.output() if self.prompt_scores is not None else None
        return SamplerOutput(token_ids, chosen, top, pooled, prompt_logprobs)


class Sampler:
    def __init__(self) -> None:
        self._last_plan: _Plan | None = None

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
        plan = self._plan(rows, logits.shape[1], draft_positions)
        raw_logprobs = None
        if plan.logprobs:  # taken before anything below changes the logits
            wanted = logits if len(plan.logprobs) == len(rows) else logits[_index(plan.logprobs, logits)]
            raw_logprobs = wanted.log_softmax(dim=-1)
        if plan.restricted:
            restricted_rows, masks = plan.allowed(logits)
            logits[restricted_rows] += masks
        if plan.banning:
            _mask_bad_words(logits, rows, plan.banning)
        if plan.min_tokens:
            _mask_stop_tokens(logits, rows, plan.min_tokens, eos_token_ids)
        if plan.biased:
            row_of, token_of, bias = plan.biases(logits)
            logits[row_of, token_of] += bias
        if plan.penalties:
            _apply_penalties(logits, rows, plan.penalties)
        if plan.thinking_ends:
            _end_thinking(logits, rows, plan.thinking_ends)
        unusable = _unusable_rows(logits)
        sampled = SampledTokens(_choose(logits, plan.draws), rows, plan.logprobs, unusable=unusable)
        if raw_logprobs is not None:
            _add_logprobs(sampled, raw_logprobs)
        return sampled

    def _plan(self, rows: list[SamplingRow], vocab: int, draft_positions: list[int] | None) -> _Plan:
        """The last step's plan when these are its rows (decode steps in a row), else a new one.
        Speculative steps, whose rows repeat at draft positions, always make their own."""
        last = self._last_plan
        if draft_positions is None and last is not None and last.holds(rows, vocab):
            last.refresh()
            return last
        plan = _Plan.of(rows, vocab, draft_positions)
        self._last_plan = plan if draft_positions is None else None
        return plan


def logit_bias_entries(params: list[SamplingParams], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each `logit_bias` entry of the rows of `params` within the vocabulary (the width of
    `like`), as (row, token, bias) tensors on `like`'s device: `like[rows, tokens] += biases`."""
    vocab = like.shape[1]
    entries = [(i, token, bias) for i, p in enumerate(params) if p.logit_bias
               for token, bias in p.logit_bias.items() if token < vocab]
    rows, tokens, biases = zip(*entries) if entries else ((), (), ())
    return _index(list(rows), like), _index(list(tokens), like), _values(list(biases), like)


def allowed_token_masks(params: list[SamplingParams], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `params` with `allowed_token_ids`, and what to add to their logits (rows
    as wide as `like`, on its device): 0 at each allowed token, -inf at every other."""
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    vocab = like.shape[1]
    masks = torch.full((len(rows), vocab), _NEG_INF, dtype=like.dtype, device=like.device)
    pairs = [(k, token) for k, i in enumerate(rows) for token in params[i].allowed_token_ids if token < vocab]
    mask_rows, tokens = zip(*pairs) if pairs else ((), ())
    masks[_index(list(mask_rows), like), _index(list(tokens), like)] = 0
    return _index(rows, like), masks


def _index(row_numbers: list[int], like: torch.Tensor) -> torch.Tensor:
    return to_device(row_numbers, torch.long, like.device)


def _unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """The rows with nothing to draw from: a NaN, an infinite largest logit, or every logit
    -inf (a numerically broken model; every way a request could ask for it is refused). They
    are zeroed, so that the draw runs on numbers and picks a token that `output` replaces by
    NO_TOKEN: the request fails alone, not the whole step. On the CPU only when some row is
    unusable; on a device always (a check would wait for it)."""
    unusable = ~torch.isfinite(logits.amax(dim=-1, keepdim=True))
    if logits.device.type != "cpu" or unusable.any():
        logits.masked_fill_(unusable, 0.0)
    return unusable.squeeze(1)


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


def _end_thinking(logits: torch.Tensor, rows: list[SamplingRow], ending: list[int]) -> None:
    """The rows in `ending` can take only the token that ends their thinking."""
    index = _index(ending, logits)
    logits[index] = _NEG_INF
    logits[index, _index([rows[i].params.thinking_budget.end_token_id for i in ending], logits)] = 0.0


def _mask_bad_words(logits: torch.Tensor, rows: list[SamplingRow], banning: list[int]) -> None:
    """Mask, in each row of `banning`, the last token of every bad word whose earlier tokens
    the row's output ends with (of a one-token word, always)."""
    vocab = logits.shape[1]
    pairs = []
    for i in banning:
        row = rows[i]
        output_length = len(row.token_ids) - row.num_prompt_tokens
        for word in row.bad_words:
            before = len(word) - 1
            if word[-1] < vocab and before <= output_length and (
                    before == 0 or row.token_ids[len(row.token_ids) - before:] == list(word[:-1])):
                pairs.append((i, word[-1]))
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
    if draws.uses("temperature"):
        logits.div_(draws.column("temperature", logits))
    with_top_k = draws.with_top_k()
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
    """Rows with top-k: the floor of their kept set (top-k, then top-p and min-p within it) is
    found among their k + 1 largest probabilities, unless ties with the k-th run past them; then
    each row draws from the probabilities at or above its floor."""
    probs = logits.softmax(dim=-1)
    floor = _floor(probs, _descending(probs, draws.window(logits.shape[1], probs.device)), draws)
    return draw_weights(probs.mul_(_at_least(probs, floor)), _uniforms(draws, logits.device)[0])


def _sample_whole_rows(logits: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """Rows without top-k: min-p is a floor under the largest probability, top-p is drawn by
    rejection (`_draw_nucleus`); top-p's mass is over the whole row, as when top-p is applied
    before min-p."""
    probs = logits.softmax(dim=-1)
    if draws.uses("min_p"):  # a row without min-p has floor 0 and keeps every token
        probs.mul_(_at_least(probs, probs.amax(dim=-1, keepdim=True).mul_(draws.column("min_p", probs))))
    if draws.uses("top_p"):
        return _draw_nucleus(probs, draws.column("top_p", probs), draws)
    return draw_weights(probs, _uniforms(draws, probs.device)[0])


def _at_least(values: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """1.0 where `values` (finite) are at or above their row's `floor`, else 0.0. Arithmetic
    rather than a comparison: torch's CPU build makes and reads boolean masks several times
    slower than it computes on floats."""
    return (values - floor).sign_().add_(1.0).clamp_(max=1.0)


def _sync_stalls(device: torch.device) -> bool:
    """Whether reading a value back on `device` waits for the step's queued work, which holds
    back the scheduling of the next step (async scheduling): everywhere but on the CPU."""
    return device.type != "cpu"


def _draw_nucleus(weights: torch.Tensor, mass_limit: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """Top-p by rejection over `weights`. A token belongs to the nucleus when the weight of the
    tokens strictly more likely than it is below its row's `mass_limit` (top_p of the row's whole
    weight: this keeps the token where the mass reaches top_p, its ties, and always the most
    likely token; inf where a row has no top-p). Every row draws from its whole row; a draw in
    the nucleus is kept (conditioned on that, it follows the nucleus' renormalised
    distribution), and the few rows whose draw is not find their nucleus by sorting and draw
    again from it. On a device every row draws from its sorted nucleus instead: finding the
    rows to draw again would wait for the step (a host sync), which holds back the scheduling of
    the next one."""
    if _sync_stalls(weights.device):
        rows = draws.with_top_p()
        if len(rows) == len(weights):
            _keep_nucleus(weights, mass_limit)
        else:
            index = _index(rows, weights)
            nucleus = weights[index]
            _keep_nucleus(nucleus, mass_limit[index])
            weights[index] = nucleus
        return draw_weights(weights, _uniforms(draws, weights.device)[0])
    uniforms = _uniforms(draws, weights.device, rounds=2)
    tokens = draw_weights(weights, uniforms[0])
    outside = _outside_nucleus(weights, weights.gather(1, tokens[:, None]), mass_limit)
    if len(outside):
        tokens[outside] = _sorted_nucleus_draw(weights[outside], mass_limit[outside], uniforms[1, outside])
    return tokens


def _outside_nucleus(weights: torch.Tensor, drawn_weight: torch.Tensor, mass_limit: torch.Tensor) -> torch.Tensor:
    """The rows whose drawn token has at least `mass_limit` of weight strictly above it. That
    weight is the sum of (w - drawn)+ plus drawn once per token above it: float operations only,
    as a comparison makes torch's CPU build a slow boolean tensor."""
    excess = (weights - drawn_weight).relu_()
    above = excess.sum(dim=-1, keepdim=True) + drawn_weight * excess.sign_().sum(dim=-1, keepdim=True)
    return (above >= mass_limit).squeeze(1).nonzero().squeeze(1)


def _sorted_nucleus_draw(weights: torch.Tensor, mass_limit: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The draw from each row's nucleus, found by sorting the row (`weights` is changed)."""
    _keep_nucleus(weights, mass_limit)
    # One running sum per row: these are the few rows drawn again, so its memory stays small.
    cumulative = weights.cumsum(dim=-1, dtype=torch.float64)
    return torch.searchsorted(cumulative, uniforms[:, None] * cumulative[:, -1:], right=True).squeeze(1)


def _keep_nucleus(weights: torch.Tensor, mass_limit: torch.Tensor) -> None:
    """Zero the weights outside each row's nucleus (`_draw_nucleus` says which), by sorting."""
    descending = _descending(weights)
    mass_above = descending.cumsum(dim=-1) - descending
    smallest_kept = descending.masked_fill(mass_above >= mass_limit, math.inf).amin(dim=-1, keepdim=True)
    weights.masked_fill_(weights < smallest_kept, 0.0)


def _descending(values: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """The `width` largest of each row (all by default), largest first. On the CPU numpy's sort,
    which is vectorised where torch's sort and topk are not (about 30 times faster over a
    [256, 512] float32 batch)."""
    width = width or values.shape[1]
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(values.numpy(), axis=-1)[:, : -width - 1 : -1].copy())
    if width == values.shape[1]:
        return values.sort(dim=-1, descending=True).values
    return values.topk(width, dim=-1).values


def _floor(probs: torch.Tensor, values: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """The smallest probability each row keeps: top-k's (ties with the k-th largest kept too),
    raised by top-p's over what top-k keeps, and by min-p's. `values` are the largest
    probabilities of each row, in descending order."""
    width = values.shape[1]
    floor = _at(values, _index([k - 1 if k else width for k in draws.top_k], probs)[:, None])
    if draws.uses("top_p"):
        floor = torch.maximum(floor, _top_p_floor(probs, values, floor, draws))
    if draws.uses("min_p"):
        floor = torch.maximum(floor, values[:, :1] * draws.column("min_p", probs))
    return floor


def _top_p_floor(probs: torch.Tensor, values: torch.Tensor, kth: torch.Tensor, draws: _Draws) -> torch.Tensor:
    """Top-p keeps the smallest set of most likely tokens whose mass, under what top-k kept
    (probs >= kth), reaches top_p: every token at least as likely as the one at which the mass
    reaches it (ties with it included, and always the most likely token). The largest `values`
    hold that set except in a row whose top-k ties run past them: those sort their row."""
    top_p = draws.column("top_p", probs)
    floor = _nucleus_floor(values * _at_least(values, kth), top_p)
    if values.shape[1] < probs.shape[1]:
        unsettled = (top_p < 1.0) & (kth == values[:, -1:])
        rows = unsettled.squeeze(1).nonzero().squeeze(1)  # a host sync: on the CPU only (`window`)
        if len(rows):
            descending = _descending(probs[rows])
            floor[rows] = _nucleus_floor(descending * _at_least(descending, kth[rows]), top_p[rows])
    return floor


def _nucleus_floor(descending: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The probability at which the mass of `descending` (most likely first, zeros past what is
    kept), renormalised, reaches top_p; 0 (no floor) where it stays below."""
    mass = descending.cumsum(dim=-1)
    return _at(descending, (mass < top_p * mass[:, -1:]).sum(dim=-1, keepdim=True))


def _at(descending: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """descending[row, index[row]], or 0 (a floor that keeps everything) where the index is one
    past the last column."""
    return F.pad(descending, (0, 1), value=0.0).gather(1, index)


def draw_weights(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn in proportion to `weights` (>= 0, at least one positive per row)
    by inverse transform sampling in two levels, so that no running sum over the whole
    vocabulary is needed: u picks a block of _BLOCK tokens by the blocks' cumulative weight, then
    where u fell within that block's share picks a token by the block's own cumulative weight.
    Running sums are in float64, so rounding moves no noticeable mass between tokens; and both
    fractions stay below 1, so a token of weight 0 (filtered, or padding) is never drawn."""
    if weights.shape[1] % _BLOCK:
        weights = F.pad(weights, (0, -weights.shape[1] % _BLOCK))
    blocks = weights.reshape(len(weights), -1, _BLOCK)
    cumulative = blocks.sum(dim=-1).double().cumsum_(dim=-1)  # the weight up to each block's end
    target = uniforms[:, None] * cumulative[:, -1:]
    block = torch.searchsorted(cumulative, target, right=True)  # the first block ending past the target
    in_block = blocks[torch.arange(len(blocks), device=weights.device), block.squeeze(1)].cumsum(
        dim=-1, dtype=torch.float64)
    # Where the target falls in its block, as a fraction of the block's weight.
    fraction = ((target - cumulative.gather(1, block)) / in_block[:, -1:]).add_(1.0).clamp_(0.0, _MAX_UNIFORM)
    chosen = torch.searchsorted(in_block, fraction * in_block[:, -1:], right=True)
    return (block * _BLOCK + chosen).squeeze(1)


def _uniforms(draws: _Draws, device: torch.device, rounds: int = 1) -> torch.Tensor:
    """[rounds, draws] numbers in [0, 1) with 52 random bits, on `device`: row j is for attempt j
    of a draw (top-p's rejection may draw again). A seeded draw's numbers are a hash of its seed,
    its counter and the attempt; the others come from one call to torch's default generator. The
    hashing runs in numpy: a handful of operations on a few hundred integers, where each torch
    call would cost more than its work."""
    shape = (rounds, len(draws.rows))
    if not draws.uses("seed"):
        numbers = unseeded_uniforms(shape)
    else:
        numbers = seeded_uniforms(draws.seed_streams(), np.asarray(draws.counters), np.arange(rounds)[:, None])
        if draws.uses("no_seed"):
            numbers = np.where(draws.seeded, numbers, unseeded_uniforms(shape))
    return to_device(numbers, torch.float64, device)


def unseeded_uniforms(shape: tuple[int, ...]) -> np.ndarray:
    """Numbers in [0, 1) with 52 random bits from torch's default generator."""
    return torch.randint(1 << _UNIFORM_BITS, shape).numpy() * 2.0**-_UNIFORM_BITS


def seed_streams(seeds: list[int]) -> np.ndarray:
    """Each seed hashed into the start of its stream of random numbers."""
    return _split_mix(np.asarray(seeds, dtype=np.int64).view(np.uint64))


def seeded_uniforms(streams: np.ndarray, counters: np.ndarray, attempts: int | np.ndarray) -> np.ndarray:
    """Numbers in [0, 1) with 52 random bits that depend on nothing but a seed's stream (from
    `seed_streams`), the index of the output token drawn and the attempt (< _UNIFORMS_PER_TOKEN),
    broadcast together."""
    steps = counters.astype(np.uint64) * np.uint64(_UNIFORMS_PER_TOKEN) + np.asarray(attempts, dtype=np.uint64)
    return (_split_mix(streams + steps * _GOLDEN_GAMMA) >> np.uint64(64 - _UNIFORM_BITS)) * 2.0**-_UNIFORM_BITS


def _split_mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 values (products wrap modulo 2^64): a seeded draw's
    numbers are this of its stream's start, from the seed by the same function, plus (counter *
    _UNIFORMS_PER_TOKEN + attempt) golden-ratio steps."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _add_logprobs(sampled: SampledTokens, raw_logprobs: torch.Tensor) -> None:
    """The sampled token's raw logprob and the most likely ones, for the rows that asked."""
    rows, wanted = sampled.rows, sampled.logprob_rows
    tokens = sampled.token_ids if len(wanted) == len(rows) else sampled.token_ids[_index(wanted, raw_logprobs)]
    sampled.sampled_logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    most = max(rows[i].params.logprobs for i in wanted)
    sampled.top_values, sampled.top_ids = raw_logprobs.topk(most, dim=-1)
