"""The engine learns how long its steps take (`StepCostFit`) and reports it with the tokens it
has queued; the router's `seconds` cost predicts time to first token from both."""

import random

import pytest

from kvserve.workers.engine.step_costs import MIN_STEPS, StepCostFit
from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams


def test_the_fit_recovers_a_steps_cost_and_follows_a_change():
    rng = random.Random(0)
    fit = StepCostFit(tokens_per_step=512)
    for _ in range(MIN_STEPS - 1):
        fit.observe(rng.randrange(512), rng.randrange(64), 0.01)
    assert fit.model() is None  # too few steps yet
    for _ in range(4000):
        prefill, decodes = rng.choice([0, 0, rng.randrange(1, 512)]), rng.randrange(64)
        fit.observe(prefill, decodes, 0.004 + 2e-5 * prefill + 1e-4 * decodes + rng.gauss(0, 1e-4))
    cost = fit.model()
    assert cost.base_s == pytest.approx(0.004, rel=0.05)
    assert cost.per_prefill_token_s == pytest.approx(2e-5, rel=0.05)
    assert cost.per_decode_seq_s == pytest.approx(1e-4, rel=0.05)
    assert cost.tokens_per_step == 512
    for _ in range(6000):  # the replica got twice as slow: the old steps fade out
        prefill, decodes = rng.choice([0, rng.randrange(1, 512)]), rng.randrange(64)
        fit.observe(prefill, decodes, 2 * (0.004 + 2e-5 * prefill + 1e-4 * decodes))
    assert fit.model().per_prefill_token_s == pytest.approx(4e-5, rel=0.05)


def test_a_loose_coefficient_is_fitted_within_the_others_not_clipped():
    """Two long prefills of about the same length, the rest decodes of one sequence (a
    replica's first second of work): the steps say little of the cost per prompt token, and
    the unconstrained fit gives it a negative slope. The nonnegative fit still predicts the
    steps it saw; clipping that slope to 0 left a decode step predicted at 0.18 s."""
    fit = StepCostFit(tokens_per_step=2048)
    steps = [(2048, 0, 0.1252), (1966, 0, 0.1272)] + [(0, 1, 0.0147)] * MIN_STEPS
    for prefill, decodes, seconds in steps:
        fit.observe(prefill, decodes, seconds)
    cost = fit.model()
    assert min(cost.base_s, cost.per_prefill_token_s, cost.per_decode_seq_s) >= 0
    for prefill, decodes, seconds in steps:
        predicted = cost.base_s + cost.per_prefill_token_s * prefill + cost.per_decode_seq_s * decodes
        assert predicted == pytest.approx(seconds, rel=0.05)


def test_decode_steps_alone_report_no_cost():
    fit = StepCostFit(tokens_per_step=512)
    for _ in range(4 * MIN_STEPS):
        fit.observe(0, 32, 0.01)
    assert fit.model() is None  # nothing says what a prompt token costs


def test_the_engine_reports_its_queue_and_its_step_cost(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=64, max_model_len=128, block_size=8,
              max_num_batched_tokens=16, max_num_seqs=2)
    engine = llm.engine
    shared = list(range(3, 27))
    engine.add_request("first", shared + [30], SamplingParams(max_tokens=40, ignore_eos=True))
    while engine.scheduler.waiting or engine.requests["first"][0].num_output_tokens < 2:
        engine.step()
    # The second finds 3 cached blocks (24 tokens); the third waits behind two running ones.
    engine.add_request("second", shared + [31, 32], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("third", list(range(100, 120)), SamplingParams(max_tokens=4, ignore_eos=True))
    stats = engine.stats()
    assert stats.queued_tokens == 1 + (26 - 24) + 20
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().queued_tokens == 0
    assert engine.step_costs.num_steps >= MIN_STEPS and engine.stats().step_cost.tokens_per_step == 16
