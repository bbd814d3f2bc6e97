"""The sampler draws from each request's own distribution: statistical tests.

For each setting the exact target distribution is computed here in plain PyTorch, in float64:
the softmax of the temperature-scaled logits restricted to the tokens that top-k, top-p and
min-p keep, renormalised. It is compared with the tokens of thousands of rows drawn in one
batch by a Pearson chi-square test: the test fails when the statistic is past the level that a
correct sampler exceeds with probability ALPHA, a real statistical bound rather than a tolerance.
The generators are seeded, so that each run draws the same tokens; a token outside the kept set
fails the test outright.

The logits are built so that no cumulative mass or probability ratio lies near a filter's
threshold (`target` checks it): float32 in the sampler and float64 here keep the same tokens.
"""

import math

import pytest
import torch

from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.runner.sampler import Sampler, SamplingRow

ALPHA = 1e-3  # the chance that a correct sampler fails one comparison
DRAWS = 3000  # rows per comparison
MIN_EXPECTED = 5.0  # tokens expected fewer times share one cell of the chi-square test
MARGIN = 1e-3  # how far every threshold stays from the masses and ratios it is compared with

VOCAB = 1000
HEAD = 30  # tokens 0.25 nats apart, then 500 tokens tied at -8 and 470 tied at -10


def make_logits() -> torch.Tensor:
    """A distribution with a head and two tied plateaus, its tokens scattered over the
    vocabulary so that a token's id says nothing about its rank."""
    head = -0.25 * torch.arange(HEAD)
    ranked = torch.cat([head, torch.full((500,), -8.0), torch.full((VOCAB - HEAD - 500,), -10.0)])
    return ranked[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))]


LOGITS = make_logits()

SETTINGS = {
    "temperature": {"temperature": 0.7},
    "top_k": {"top_k": 8},
    "top_p": {"top_p": 0.56},
    # Past the head and into the first plateau, whose ties are all kept: a nucleus of 530
    # tokens, wider than the window, so its floor comes from sorting the row.
    "wide_top_p": {"top_p": 0.98},
    "min_p": {"min_p": 0.1},
    "combined": {"temperature": 1.5, "top_k": 20, "top_p": 0.7, "min_p": 0.08},
}


def target(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probability of each token under `params`, by a full sort in float64."""
    scaled = logits.double() / params.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if params.top_k > 0:
        kth = scaled.topk(params.top_k).values[-1]
        keep &= scaled >= kth
    if params.top_p < 1.0:
        probs = scaled.masked_fill(~keep, -math.inf).softmax(dim=-1)
        descending = probs.sort(descending=True).values
        mass = descending.cumsum(dim=-1)
        ends_of_ties = torch.cat([descending[1:] < descending[:-1], torch.tensor([True])])
        assert ((mass[ends_of_ties] - params.top_p).abs() > MARGIN).all(), "a cumulative mass lies near top_p"
        keep &= probs >= descending[int((mass < params.top_p).sum())]  # ties with the last kept too
    if params.min_p > 0.0:
        ratio = (scaled - scaled.max()).exp()
        assert ((ratio - params.min_p).abs() > MARGIN).all(), "a probability ratio lies near min_p"
        keep &= ratio >= params.min_p
    return scaled.masked_fill(~keep, -math.inf).softmax(dim=-1)


def chi_square_p_value(tokens: list[int], probs: torch.Tensor) -> float:
    """The chance that a sampler drawing from `probs` gives a Pearson statistic at least this
    large. Tokens are cells, most likely first; those expected fewer than MIN_EXPECTED times
    share the last cell."""
    observed = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    order = probs.argsort(descending=True)
    expected = probs[order] * len(tokens)
    observed = observed[order]
    cells = max(1, int((expected >= MIN_EXPECTED).sum()))
    expected = torch.cat([expected[: cells - 1], expected[cells - 1 :].sum(dim=0, keepdim=True)])
    observed = torch.cat([observed[: cells - 1], observed[cells - 1 :].sum(dim=0, keepdim=True)])
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees = len(expected) - 1
    return torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2).item()


def assert_drawn_from(tokens: list[int], probs: torch.Tensor) -> None:
    outside = sorted({t for t in tokens if probs[t] == 0})
    assert not outside, f"tokens that the filters drop were drawn: {outside[:10]}"
    p_value = chi_square_p_value(tokens, probs)
    assert p_value > ALPHA, f"the draws do not follow the distribution (p = {p_value:.2e})"


def seeded_rows(params: SamplingParams, count: int, first_seed: int, counter: int) -> list[SamplingRow]:
    """`count` rows with consecutive seeds (as the samples of one request), each at `counter`."""
    return [SamplingRow(params, [1] * (1 + counter), 1, first_seed + i) for i in range(count)]


def one_seed_rows(params: SamplingParams, count: int, seed: int) -> list[SamplingRow]:
    """One sequence's successive steps: the same seed at counters 0 .. count-1 (the rows share
    one token list; only its length past the prompt matters here)."""
    tokens = [1] * count
    return [SamplingRow(params, tokens, count - counter, seed) for counter in range(count)]


def draw(rows: list[SamplingRow], logits: torch.Tensor = LOGITS) -> list[int]:
    return Sampler()(logits.expand(len(rows), -1).clone(), rows).token_ids


@pytest.fixture(autouse=True)
def fixed_global_seed():
    torch.manual_seed(0)


def test_the_wide_setting_keeps_hundreds_of_tokens():
    assert int((target(LOGITS, SamplingParams(**SETTINGS["wide_top_p"])) > 0).sum()) > 256


@pytest.mark.parametrize("name", SETTINGS)
def test_unseeded_and_seeded_rows_draw_from_the_target(name):
    """One batch: unseeded rows, then rows with consecutive seeds (the hashed draws)."""
    params = SamplingParams(**SETTINGS[name])
    rows = [SamplingRow(params, [1], 1) for _ in range(DRAWS)] + seeded_rows(params, DRAWS, 1000, counter=5)
    tokens = draw(rows)
    probs = target(LOGITS, params)
    assert_drawn_from(tokens[:DRAWS], probs)
    assert_drawn_from(tokens[DRAWS:], probs)


@pytest.mark.parametrize("name", ["temperature", "combined"])
def test_one_seed_over_many_steps_draws_from_the_target(name):
    params = SamplingParams(**SETTINGS[name])
    assert_drawn_from(draw(one_seed_rows(params, DRAWS, seed=-77)), target(LOGITS, params))


def test_each_row_of_a_mixed_batch_keeps_its_own_distribution():
    """Every setting in one batch, interleaved, half of the rows seeded: each stage applies to
    its rows only, whatever the other rows use."""
    names = list(SETTINGS)
    params = [SamplingParams(**SETTINGS[name]) for name in names]
    rows = [
        SamplingRow(params[i % len(names)], [1, 2], 1, i if i % 2 else None)
        for i in range(DRAWS * len(names))
    ]
    tokens = draw(rows)
    for k, name in enumerate(names):
        assert_drawn_from(tokens[k :: len(names)], target(LOGITS, params[k]))


def test_a_biased_sampler_fails_the_test():
    """The test has power: draws from the untempered distribution fail the tempered target."""
    untempered = draw([SamplingRow(SamplingParams(), [1], 1) for _ in range(DRAWS)])
    assert chi_square_p_value(untempered, target(LOGITS, SamplingParams(temperature=0.7))) < ALPHA
