import math
import random

import pytest
import torch

from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.sequence import Sequence
from kvserve.workers.runner import sampler as sampler_module
from kvserve.workers.runner.sampler import Sampler, SamplingRow

VOCAB = 64
WIDE = 1000  # more tokens than a top-k window holds
EOS = 2
PROBS = [0.5, 0.3, 0.15, 0.05]  # a distribution whose filtered sets are easy to tell apart


@pytest.fixture(autouse=True)
def fixed_global_seed():
    torch.manual_seed(0)


def sample(logits: torch.Tensor, rows: list[SamplingRow], eos: tuple[int, ...] = (EOS,)):
    """The sampler changes its input in place; the tests keep theirs."""
    return Sampler()(logits.clone(), rows, eos)


def row(prompt=(1,), output=(), seed=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt) + list(output), len(prompt), seed)


def draws(probs: list[float], count: int, **params) -> list[int]:
    """`count` tokens drawn in one batch from `probs`, each row unseeded."""
    return draws_from(torch.tensor(probs).log(), count, **params)


def draws_from(logits: torch.Tensor, count: int, **params) -> list[int]:
    return sample(logits.expand(count, -1), [row(**params) for _ in range(count)]).token_ids


def frequencies(tokens: list[int], vocab: int) -> list[float]:
    return [tokens.count(token) / len(tokens) for token in range(vocab)]


@pytest.fixture(params=["host_check", "sync_free"])
def top_p_path(request, monkeypatch):
    """Both ways the sampler filters top-p: by rejection, with a host check of the draws (on the
    CPU), and by sorting every top-p row, with nothing read back (on a device, where the check
    would stall the next step's scheduling), the latter run here on the CPU."""
    if request.param == "sync_free":
        monkeypatch.setattr(sampler_module, "_sync_stalls", lambda device: True)
    return request.param


def test_greedy_is_argmax():
    logits = torch.randn(8, VOCAB)
    out = sample(logits, [row(temperature=0) for _ in range(8)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8 and out.top_logprobs == [None] * 8


def test_top_k_of_one_is_greedy():
    logits = torch.randn(8, VOCAB)
    assert sample(logits, [row(top_k=1) for _ in range(8)]).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_most_likely_token(top_p_path):
    logits = torch.randn(200, VOCAB)
    assert sample(logits, [row(top_p=1e-9) for _ in range(200)]).token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    "params, kept",
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_p": 0.75}, {0, 1}),
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"min_p": 0.25}, {0, 1, 2}),
        ({"min_p": 0.5}, {0, 1}),
        ({"top_k": 3, "top_p": 0.5}, {0}),
        ({}, {0, 1, 2, 3}),
    ],
)
def test_filters_keep_exactly_the_expected_tokens(params, kept, top_p_path):
    assert set(draws(PROBS, 2000, **params)) == kept


def test_filters_apply_per_row_in_a_mixed_batch(top_p_path):
    settings = [{"top_k": 2}, {}, {"min_p": 0.5}, {"top_p": 0.85}, {"temperature": 0}]
    kept = [{0, 1}, {0, 1, 2, 3}, {0, 1}, {0, 1, 2}, {0}]
    rows = [row(**settings[i % 5]) for i in range(2000)]
    tokens = sample(torch.tensor(PROBS).log().expand(len(rows), -1), rows).token_ids
    for k in range(5):
        assert set(tokens[k::5]) == kept[k]


def test_top_k_keeps_every_token_tied_with_the_kth_even_past_the_window():
    logits = torch.full((WIDE,), -5.0)
    logits[0] = 1.0
    logits[100:500] = 0.0  # 400 tokens tied for second place
    tokens = set(draws_from(logits, 4000, top_k=2))
    assert tokens <= {0, *range(100, 500)} and len(tokens) > 350


def test_top_p_within_top_k_keeps_the_ties_that_run_past_the_window(top_p_path):
    logits = torch.full((WIDE,), -30.0)
    logits[0] = math.log(0.2)
    logits[100:500] = math.log(0.002)  # 400 tokens tied with the second: top_k=2 keeps them all
    # Under top-k the tied tokens hold 0.8 of 1.0: top_p=0.9 reaches past the most likely token
    # into the ties, and keeps them all.
    tokens = set(draws_from(logits, 4000, top_k=2, top_p=0.9))
    assert tokens <= {0, *range(100, 500)} and len(tokens) > 350
    assert set(draws_from(logits, 500, top_k=2, top_p=0.1)) == {0}


def test_top_p_keeps_every_token_tied_with_the_one_that_reaches_it(top_p_path):
    # The mass reaches 0.5 at token 1 or 2, whichever comes first: both are kept.
    assert set(draws([0.4, 0.2, 0.2, 0.1, 0.1], 2000, top_p=0.5)) == {0, 1, 2}


def test_a_wide_nucleus_is_kept_whole(top_p_path):
    logits = torch.full((WIDE,), -20.0)
    logits[:512] = torch.linspace(0.0, -0.01, 512)  # nearly flat
    kept = int((logits.double().softmax(dim=-1).cumsum(dim=-1) < 0.9).sum()) + 1
    tokens = set(draws_from(logits, 6000, top_p=0.9))
    assert tokens <= set(range(kept)) and len(tokens) > kept - 20


def test_draws_follow_the_distribution():
    observed = frequencies(draws(PROBS, 4000), 4)
    assert all(abs(o - p) < 0.04 for o, p in zip(observed, PROBS)), observed


def test_low_temperature_sharpens_and_high_temperature_flattens():
    cold = frequencies(draws(PROBS, 2000, temperature=0.25), 4)
    hot = frequencies(draws(PROBS, 2000, temperature=4.0), 4)
    assert cold[0] > 0.8
    assert hot[0] < 0.4 and min(hot) > 0.15


def naive_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams):
    """One row at a time, token by token: the reading of vLLM's penalties the sampler must match."""
    logits = logits.clone()
    for token in set(prompt + output):
        value = logits[token]
        logits[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token in set(output):
        logits[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return logits


def test_penalties_match_a_naive_per_row_loop():
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        params = rng.choice(
            [
                {"repetition_penalty": rng.uniform(0.5, 2.0)},
                {"presence_penalty": rng.uniform(-2, 2)},
                {"frequency_penalty": rng.uniform(-2, 2)},
                {
                    "repetition_penalty": rng.uniform(0.5, 2.0),
                    "presence_penalty": rng.uniform(-2, 2),
                    "frequency_penalty": rng.uniform(-2, 2),
                },
                {},
            ]
        )
        history = [rng.randrange(8) for _ in range(rng.randrange(12))]  # few tokens: many repeats
        cut = rng.randrange(len(history) + 1)
        rows.append(row(history[:cut] or [1], history[cut:], temperature=0, **params))
    # Small logits around the argmax: the penalties decide which token wins.
    logits = torch.randn(len(rows), 8)
    expected = [
        naive_penalties(logits[i], r.token_ids[: r.num_prompt_tokens], r.output_token_ids, r.params).argmax().item()
        for i, r in enumerate(rows)
    ]
    assert sample(logits, rows).token_ids == expected
    assert expected != logits.argmax(dim=-1).tolist()  # the penalties did change tokens


def test_min_tokens_blocks_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(4, VOCAB)
    logits[:, EOS] = 10.0
    logits[:, 5] = 9.0
    logits[:, 7] = 8.0
    rows = [
        row(output=[], temperature=0, min_tokens=2, stop_token_ids=[5]),
        row(output=[3], temperature=0, min_tokens=2, stop_token_ids=[5], ignore_eos=True),
        row(output=[3, 4], temperature=0, min_tokens=2, stop_token_ids=[5]),
        row(output=[], temperature=0, min_tokens=2),
    ]
    assert sample(logits, rows).token_ids == [7, 7, EOS, 5]


def test_logit_bias_is_added_before_the_argmax_and_the_penalties():
    rng = random.Random(1)
    rows, expected = [], []
    logits = torch.randn(200, 8)
    for i in range(len(logits)):
        bias = {rng.randrange(10): rng.uniform(-3, 3) for _ in range(rng.randrange(4))}  # ids 8, 9: beyond the logits
        params = {"repetition_penalty": 1.7} if i % 3 == 0 else {}
        rows.append(row([1], [rng.randrange(8)], temperature=0, logit_bias=bias, **params))
        biased = logits[i].clone()
        for token, value in bias.items():
            if token < 8:
                biased[token] += value
        if params:
            biased = naive_penalties(biased, [1], rows[-1].output_token_ids, rows[-1].params)
        expected.append(biased.argmax().item())
    assert sample(logits, rows).token_ids == expected
    assert expected != logits.argmax(dim=-1).tolist()


def test_logit_bias_moves_draws_and_leaves_logprobs_raw():
    logits = torch.tensor(PROBS).log()
    tokens = draws_from(logits, 4000, logit_bias={3: 100.0, 0: -100.0})
    assert set(tokens) == {3}
    out = sample(logits[None], [row(logprobs=1, logit_bias={3: 100.0})])
    assert out.token_ids == [3] and math.isclose(out.logprobs[0], math.log(PROBS[3]), rel_tol=1e-5)


def test_allowed_token_ids_leave_only_those_to_take():
    """Against a naive per-row mask: greedy rows take the argmax among their allowed tokens,
    drawing rows draw only those, rows without a list anything; logprobs stay raw."""
    rng = random.Random(2)
    logits = torch.randn(300, VOCAB)
    rows, allowed = [], []
    for i in range(len(logits)):
        tokens = rng.sample(range(VOCAB + 4), rng.randint(1, 6)) if i % 4 else None  # ids past the logits: ignored
        if tokens is not None and all(t >= VOCAB for t in tokens):
            tokens.append(rng.randrange(VOCAB))
        allowed.append(tokens)
        greedy = {"temperature": 0} if i % 2 else {"temperature": 1.3, "top_k": 3}
        rows.append(row(allowed_token_ids=tokens, logprobs=0, **greedy))
    out = sample(logits, rows)
    for i, (token, tokens) in enumerate(zip(out.token_ids, allowed)):
        if tokens is not None:
            assert token in tokens
        if i % 2:
            masked = logits[i].clone()
            if tokens is not None:
                masked[[t for t in range(VOCAB) if t not in tokens]] = float("-inf")
            assert token == masked.argmax().item()
        assert out.logprobs[i] == pytest.approx(logits[i].log_softmax(-1)[token].item(), abs=1e-5)


def test_bad_words_mask_their_last_token_after_the_rest():
    """A one-token word is never taken; a longer one's last token not right after its others
    in the output (the prompt does not count)."""
    words = ((5,), (7, 9), (3, 4, 6))
    cases = [  # (output, the two tokens the row prefers, in order; what it takes)
        ([], (5, 9), 9), ([7], (9, 11), 11), ([3, 4], (6, 11), 11), ([7, 3], (9, 11), 9), ([2, 4], (6, 11), 6),
        ([], (9, 11), 9),  # right after the prompt's last token, 7
    ]
    logits = torch.zeros(len(cases), VOCAB)
    for i, (_, (first, second), _) in enumerate(cases):
        logits[i, first], logits[i, second] = 2.0, 1.0
    rows = [SamplingRow(SamplingParams(temperature=0), [7] + output, 1, bad_words=words) for output, _, _ in cases]
    assert sample(logits, rows).token_ids == [taken for _, _, taken in cases]


def test_allowed_token_ids_must_be_a_list_of_ids():
    for value in ([], [-1]):
        with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list of token ids >= 0"):
            SamplingParams(allowed_token_ids=value)


def test_a_bias_outside_its_bounds_is_refused():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})


def test_min_tokens_ignores_stop_token_ids_beyond_the_logits():
    logits = torch.randn(1, VOCAB)
    out = sample(logits, [row(temperature=0, min_tokens=1, stop_token_ids=[VOCAB + 10])], eos=(VOCAB + 1,))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def seeded_tokens(seed: int, neighbours: list[SamplingRow], position: int, steps: int = 6) -> list[int]:
    """Tokens of one seeded request over `steps` steps, sampled in a batch with `neighbours`."""
    step_logits = torch.randn(steps, VOCAB, generator=torch.Generator().manual_seed(123))
    target = row(seed=seed, top_p=0.95)
    tokens = []
    for logits in step_logits:
        batch = neighbours[:position] + [target] + neighbours[position:]
        batch_logits = torch.randn(len(batch), VOCAB)
        batch_logits[position] = logits
        token = sample(batch_logits, batch).token_ids[position]
        target.token_ids.append(token)
        tokens.append(token)
    return tokens


def test_a_seed_gives_the_same_tokens_whatever_the_rest_of_the_batch():
    alone = seeded_tokens(7, [], 0)
    neighbours = [row(), row(seed=7), row(temperature=0), row(top_k=3)]
    assert seeded_tokens(7, neighbours, 2) == alone
    assert seeded_tokens(7, neighbours[:1], 1) == alone
    assert seeded_tokens(7, neighbours[1:2], 0) == alone  # every row seeded
    assert seeded_tokens(8, [], 0) != alone


def seeded_draw(
    logits: torch.Tensor, neighbours: list[SamplingRow], position: int, output: list[int], **params
) -> int:
    """The token that a row with seed 11 and `output` draws from `logits` among `neighbours`."""
    target = row(output=output, seed=11, **params)
    batch = neighbours[:position] + [target] + neighbours[position:]
    batch_logits = torch.randn(len(batch), logits.shape[0])
    batch_logits[position] = logits
    return sample(batch_logits, batch).token_ids[position]


@pytest.mark.parametrize(
    "params",
    # top_p 0.65 keeps 287 tokens: past the window alone, within the window of the top_k=400
    # neighbour, so the row draws from its whole row in one batch and from the window in another.
    [{}, {"top_p": 0.65}, {"top_p": 0.9}, {"top_k": 20, "min_p": 0.05}, {"temperature": 0.5}],
)
def test_a_seeded_draw_depends_only_on_its_seed_counter_and_logits(params):
    """Not on the neighbours (whose filters change the window's width), the row's position,
    what its earlier tokens were (only how many), or the default generator."""
    logits = torch.randn(WIDE, generator=torch.Generator().manual_seed(5))
    neighbours = [row(), row(top_k=400), row(seed=11, top_p=0.5), row(temperature=0), row(min_p=0.2)]
    torch.manual_seed(1)
    alone = seeded_draw(logits, [], 0, [5, 6, 7], **params)
    torch.manual_seed(2)
    assert seeded_draw(logits, neighbours, 3, [9, 9, 9], **params) == alone
    torch.manual_seed(3)
    assert seeded_draw(logits, neighbours[1:2], 1, [1, 2, 3], **params) == alone


def test_drawing_a_step_again_gives_the_same_token():
    """A preempted sequence recomputes its step: a seeded row keeps no state that a draw advances."""
    logits = torch.randn(1, WIDE)
    target = row(output=[3, 4], seed=5, top_p=0.9)
    first = sample(logits, [target]).token_ids
    sample(torch.randn(3, WIDE), [row(seed=5), row(), row(output=[1, 2], seed=5)])
    assert sample(logits, [target]).token_ids == first


def test_the_counter_and_the_seed_each_change_the_draw():
    """Over 1000 equally likely tokens: one seed at 64 counters, and 64 seeds at one counter."""
    logits = torch.zeros(64, WIDE)
    by_counter = sample(logits, [row(output=[0] * counter, seed=3) for counter in range(64)]).token_ids
    by_seed = sample(logits, [row(output=[0, 0], seed=seed) for seed in range(64)]).token_ids
    assert len(set(by_counter)) > 56 and len(set(by_seed)) > 56
    assert by_counter[2] != by_seed[0]  # seed 3 against seed 0, both at counter 2


def test_seeds_span_the_signed_64_bit_range():
    seeds = [-(2**63), -1, 0, 1, 2**32, 2**63 - 1]
    tokens = sample(torch.zeros(len(seeds), WIDE), [row(seed=seed) for seed in seeds]).token_ids
    assert len(set(tokens)) == len(seeds)


def test_a_sample_seed_is_the_request_seed_plus_its_index_in_64_bits():
    params = SamplingParams(n=3, seed=2**63 - 1)
    assert [Sequence("r", i, [1], params, 0.0).seed for i in range(3)] == [2**63 - 1, -(2**63), -(2**63) + 1]
    assert Sequence("r", 1, [1], SamplingParams(n=2), 0.0).seed is None


def test_unseeded_draws_follow_the_default_generator():
    logits = torch.zeros(16, WIDE)
    torch.manual_seed(3)
    first = sample(logits, [row() for _ in range(16)]).token_ids
    torch.manual_seed(3)
    assert sample(logits, [row() for _ in range(16)]).token_ids == first


def test_unseeded_rows_differ_from_each_other():
    tokens = sample(torch.zeros(16, 1000), [row() for _ in range(16)]).token_ids
    assert len(set(tokens)) > 8


def test_logprobs_are_those_of_the_raw_logits():
    logits = torch.randn(4, VOCAB)
    rows = [
        row(output=[4, 4], logprobs=5, temperature=0.7, top_k=10, repetition_penalty=1.5, min_tokens=5),
        row(temperature=0),
        row(logprobs=0, min_tokens=3),
        row(logprobs=20, temperature=0),
    ]
    out = sample(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    for i in (0, 2, 3):
        assert math.isclose(out.logprobs[i], expected[i, out.token_ids[i]].item(), abs_tol=1e-6)
    top_values, top_ids = expected[0].topk(5)
    ids, values = zip(*out.top_logprobs[0])
    assert list(ids) == top_ids.tolist()
    torch.testing.assert_close(torch.tensor(values), top_values)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    assert len(out.top_logprobs[3]) == 20 and out.top_logprobs[3][0][0] == out.token_ids[3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_drawing_on_cuda_reads_nothing_back_before_the_tokens():
    """Every filter, seeded or not, draws on the device without a host sync (which would stall
    the scheduling of the next step), and keeps the same tokens as on the CPU."""
    settings = [{}, {"temperature": 0}, {"top_k": 2}, {"top_p": 0.85}, {"top_k": 3, "top_p": 0.5},
                {"min_p": 0.5}, {"top_p": 0.75}, {"top_k": 3, "min_p": 0.25, "top_p": 0.9}]
    kept = [{0, 1, 2, 3}, {0}, {0, 1}, {0, 1, 2}, {0}, {0, 1}, {0, 1}, {0, 1, 2}]
    # Every other round of the settings seeded, each row with its own seed.
    rows = [row(seed=i if i // len(settings) % 2 else None, **settings[i % len(settings)])
            for i in range(400 * len(settings))]
    logits = torch.tensor(PROBS).log().repeat(len(rows), 1).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampled = Sampler().sample(logits, rows, (EOS,))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens = sampled.output().token_ids
    for k in range(len(settings)):
        assert set(tokens[k::len(settings)]) == kept[k], settings[k]
