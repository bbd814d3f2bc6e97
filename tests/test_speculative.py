"""Speculative decoding: proposals change how many forward passes a sequence takes, never its
tokens. Greedy and seeded outputs equal those without speculation on every tiny architecture,
with preemption (a tiny pool), prefix caching, n > 1, stop strings and logprobs; the
verification's draws keep the target distribution (a chi-square test); the KV pool holds no
block afterwards."""

import pytest
import torch

from kvserve.cluster.cli import build_parser, config_overrides
from kvserve.cluster.config import load_config
from kvserve.workers.engine.config import SpeculativeConfig
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.speculative.ngram import NgramProposer
from kvserve.workers.engine.speculative.speculation import Speculation
from kvserve.workers.llm import LLM
from kvserve.workers.runner.sampler import Sampler, SamplingRow
from test_sampler_distribution import ALPHA, chi_square_p_value

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# A pool of 24 blocks of 4 tokens for sequences of up to 80: several running at once preempt.
TINY_POOL = {"device": "cpu", "block_size": 4, "num_kv_blocks": 24, "max_model_len": 80, "max_num_batched_tokens": 64}
REPEATING = [5, 6, 7, 8, 9] * 5
PROMPTS = [REPEATING, REPEATING[:17] + [40, 41], list(range(10, 32)), [300, 301, 302, 300, 301, 302, 300]]


def outputs(llm: LLM, params: SamplingParams, prompts=PROMPTS) -> list:
    """Each sample's tokens, text, finish reason and logprobs."""
    return [[(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in out.outputs]
            for out in llm.generate(prompts, params)]


def assert_same_outputs(got: list, expected: list) -> None:
    """Equal but for the logprobs' values, which may differ by rounding: a verification computes
    a position in a wider query than a plain decode, with float sums in another order."""
    values = lambda samples: [[v for p in logprobs or [] for v in (p.logprob, *(v for _, v in p.top))]  # noqa: E731
                              for *_, logprobs in samples]
    ids = lambda samples: [(tokens, text, reason, [(p.token_id, [t for t, _ in p.top]) for p in logprobs or []])  # noqa: E731
                           for tokens, text, reason, logprobs in samples]
    for got_samples, expected_samples in zip(got, expected, strict=True):
        assert ids(got_samples) == ids(expected_samples)
        for got_values, expected_values in zip(values(got_samples), values(expected_samples)):
            assert got_values == pytest.approx(expected_values, abs=1e-4)


def assert_pool_empty(llm: LLM) -> None:
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks and not kv.seq_blocks


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_output_is_unchanged_with_preemption_and_prefix_caching(arch, tiny_checkpoints):
    plain = LLM(str(tiny_checkpoints[arch]), **TINY_POOL)
    speculative = LLM(str(tiny_checkpoints[arch]), **TINY_POOL, speculative=NGRAM)
    greedy = SamplingParams(temperature=0, n=2, max_tokens=30, logprobs=2, ignore_eos=True)
    assert_same_outputs(outputs(speculative, greedy), outputs(plain, greedy))
    stats = speculative.engine.stats()
    assert stats.num_preemptions > 0 and stats.kv_blocks_cached > 0
    assert stats.speculative.accepted > 0
    assert_pool_empty(speculative)


def test_stop_strings_and_seeded_samples_are_unchanged(tiny_checkpoints):
    plain = LLM(str(tiny_checkpoints["llama"]), **TINY_POOL)
    speculative = LLM(str(tiny_checkpoints["llama"]), **TINY_POOL, speculative=NGRAM)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    [[(_, text, _, _)]] = outputs(plain, greedy, [REPEATING])
    stopped = greedy.model_copy(update={"stop": [text[8:11]]})
    assert_same_outputs(outputs(speculative, stopped, [REPEATING]), outputs(plain, stopped, [REPEATING]))
    seeded = SamplingParams(temperature=0.8, top_k=20, seed=11, n=2, max_tokens=30, logprobs=1, ignore_eos=True)
    assert_same_outputs(outputs(speculative, seeded), outputs(plain, seeded))
    assert_pool_empty(speculative)


def test_repetition_is_accepted_and_opting_out_proposes_nothing(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=64, max_model_len=256, speculative=NGRAM)
    opted_out = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, speculative=False)
    llm.generate([REPEATING], opted_out)
    assert llm.engine.stats().speculative.proposed == 0
    [out] = llm.generate([REPEATING], opted_out.model_copy(update={"speculative": True}))
    stats = llm.engine.stats().speculative
    assert stats.accepted > 0 and stats.verifications > 0 and stats.mean_accepted_length > 0
    assert len(stats.acceptance_rate_at) == 3 and stats.proposed == sum(stats.proposed_at)
    assert len(out.outputs[0].token_ids) == 30  # never past max_tokens


def test_ngram_proposes_what_followed_the_latest_occurrence():
    proposer = NgramProposer(num_tokens=3, min_ngram=2, max_ngram=4)
    assert proposer.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], limit=8) == [7, 8, 1]
    assert proposer.propose([1, 2, 3, 4, 1, 2], limit=1) == [3]
    assert proposer.propose([1, 2, 3, 4], limit=8) == []  # no earlier occurrence
    assert proposer.propose([1, 2, 1, 2], limit=0) == []


def test_speculative_config_from_the_command_line():
    args = build_parser().parse_args(["generate", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    engine = load_config(None, config_overrides(args), lambda: "model").engine
    assert engine.speculative == SpeculativeConfig(method="ngram", num_speculative_tokens=2)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_min=4, prompt_lookup_max=3)


DRAWS = 6000
VOCAB = 6


def test_verification_keeps_the_target_distribution():
    """A proposal [x] verified over two positions, draw after draw with distinct seeds: the
    first token follows p0, and the second follows p1 after an accepted x (and is never kept
    otherwise): P(a) = p0(a) for a != x, P(x, b) = p0(x) p1(b)."""
    logits = torch.tensor([[0.5, 1.5, -0.5, 0.2, 1.0, -1.0], [1.0, -0.3, 0.4, 2.0, -2.0, 0.0]])
    draft = 4
    params = SamplingParams(temperature=0.9)
    rows = [SamplingRow(params, [1, 2], 1, seed) for seed in range(DRAWS) for _ in range(2)]
    sampled = Sampler().sample(logits.repeat(DRAWS, 1), rows, draft_positions=[0, 1] * DRAWS).output()
    speculation = Speculation(SpeculativeConfig(method="ngram", num_speculative_tokens=1))
    outcomes = []
    for i in range(DRAWS):
        targets = sampled.token_ids[2 * i : 2 * i + 2]
        kept = targets[: speculation.num_accepted([draft], targets) + 1]
        outcomes.append(kept[0] if len(kept) == 1 else VOCAB + kept[1])
    p0, p1 = (logits / 0.9).double().softmax(dim=-1)
    expected = torch.cat([p0.clone().index_fill_(0, torch.tensor([draft]), 0.0), p0[draft] * p1])
    assert chi_square_p_value(outcomes, expected) > ALPHA
    assert speculation.stats().verifications == DRAWS
