"""Speculative decoding: proposals change how many forward passes a sequence takes, never its
tokens. Greedy and seeded outputs equal those without speculation on every tiny architecture,
with preemption (a tiny pool), prefix caching, n > 1, stop strings and logprobs; the
verification's draws keep the target distribution (chi-square tests), for a draft model's
proposals too; the KV pool holds no block afterwards, aborts and all."""

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from kvserve.cluster.cli import build_parser, config_overrides
from kvserve.cluster.config import load_config
from kvserve.cluster.preflight import check_model
from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.workers.engine.config import EngineConfig, SpeculativeConfig
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.speculative.ngram import NgramProposer
from kvserve.workers.engine.speculative.speculation import Speculation
from kvserve.workers.llm import LLM
from kvserve.workers.runner.rejection_sampling import DrawnProposal, filtered_probs, verify_drawn
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


# Weights moved by noise of 3% of their spread: a draft that agrees with its target about half
# the time, so that verifications both keep and refuse proposals.
DRAFT_NOISE = 0.03


def noisy_copy(checkpoint: Path, out: Path, scale: float = DRAFT_NOISE) -> Path:
    """`checkpoint` with every weight moved by Gaussian noise of `scale` times its spread."""
    shutil.copytree(checkpoint, out)
    generator = torch.Generator().manual_seed(0)
    for file in out.glob("*.safetensors"):
        weights = load_file(file)
        save_file({name: (w.float() + scale * w.float().std() * torch.randn(w.shape, generator=generator)).to(w.dtype)
                   for name, w in weights.items()}, file, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def drafts(tiny_checkpoints, tmp_path_factory) -> dict:
    """arch -> a draft model for the tiny checkpoint of that arch."""
    root = tmp_path_factory.mktemp("drafts")
    return {arch: noisy_copy(path, root / arch) for arch, path in tiny_checkpoints.items()}


def draft_method(model_dir: Path, k: int = 3) -> dict:
    return {"method": "draft", "model": str(model_dir), "num_speculative_tokens": k}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_draft_model_greedy_output_is_unchanged_with_preemption_and_prefix_caching(arch, tiny_checkpoints, drafts):
    plain = LLM(str(tiny_checkpoints[arch]), **TINY_POOL)
    speculative = LLM(str(tiny_checkpoints[arch]), **TINY_POOL, speculative=draft_method(drafts[arch]))
    draft = speculative.engine.speculation.draft_model
    passes = []
    run_draft = draft.model.forward
    draft.model.forward = lambda input_ids, *rest: passes.append(len(input_ids)) or run_draft(input_ids, *rest)
    greedy = SamplingParams(temperature=0, n=2, max_tokens=30, logprobs=2, ignore_eos=True)
    assert_same_outputs(outputs(speculative, greedy), outputs(plain, greedy))
    assert max(passes) <= TINY_POOL["max_num_batched_tokens"] < sum(len(p) for p in PROMPTS)  # caught up in pieces
    stats = speculative.engine.stats()
    assert stats.num_preemptions > 0 and stats.kv_blocks_cached > 0
    assert 0 < stats.speculative.accepted < stats.speculative.proposed
    assert_pool_empty(speculative)


def test_draft_model_must_share_the_targets_vocabulary(tiny_checkpoints, tmp_path):
    other_vocabulary = build_tiny_checkpoint(tmp_path / "vocab513", "llama", vocab_size=513)
    with pytest.raises(ValueError, match=r"speculative\.model: the draft model .* vocabulary of 513 tokens"):
        LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=16, speculative=draft_method(other_vocabulary))
    with pytest.raises(ValidationError, match=r"speculative\.model is needed by method 'draft'"):
        SpeculativeConfig(method="draft", num_speculative_tokens=2)
    engine = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=64,
                          speculative=draft_method(other_vocabulary))
    [problem] = check_model(engine)
    assert problem.startswith("engine.speculative.model: the draft model") and "513" in problem


def test_rejection_rule_keeps_the_target_distribution():
    """A proposal [x] drawn from q and verified over two positions, with distinct seeds: x is
    kept with probability min(1, p0(x) / q(x)), a refused one is replaced from max(0, p0 - q),
    and the target's draw follows a kept one: P(a refused in its place) = max(0, p0(a) - q(a)),
    P(x = a kept, then b) = min(p0(a), q(a)) p1(b)."""
    logits = torch.tensor([[0.5, 1.5, -0.5, 0.2, 1.0, -1.0], [1.0, -0.3, 0.4, 2.0, -2.0, 0.0]])
    q = torch.tensor([0.05, 0.1, 0.4, 0.15, 0.2, 0.1], dtype=torch.float64)
    params = SamplingParams(temperature=0.9)
    rows = [SamplingRow(params, [1, 2], 1, seed) for seed in range(DRAWS) for _ in range(2)]
    proposed = torch.multinomial(q, DRAWS, replacement=True, generator=torch.Generator().manual_seed(0)).tolist()
    proposals = [DrawnProposal(2 * i, [x], q[None]) for i, x in enumerate(proposed)]
    sampled = Sampler().sample(logits.repeat(DRAWS, 1), rows, draft_positions=[0, 1] * DRAWS)
    verify_drawn(sampled, logits.repeat(DRAWS, 1)[::2].clone(), proposals)
    targets = sampled.output().token_ids
    outcomes = [targets[2 * i] if targets[2 * i] != x else VOCAB * (1 + x) + targets[2 * i + 1]
                for i, x in enumerate(proposed)]
    p0, p1 = (logits / 0.9).double().softmax(dim=-1)
    expected = torch.cat([(p0 - q).clamp_min(0), (torch.minimum(p0, q)[:, None] * p1).flatten()])
    assert chi_square_p_value(outcomes, expected) > ALPHA


@pytest.mark.parametrize("filters", [{"top_k": 2}, {"top_p": 0.6}, {"min_p": 0.3}, {"top_k": 3, "top_p": 0.8},
                                     {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05},
                                     {"logit_bias": {5: 6.5, 0: -2.0, 9: 3.0}, "top_p": 0.9},
                                     {"allowed_token_ids": [1, 3, 4, 9], "logit_bias": {4: 2.0}, "top_k": 2},
                                     {"allowed_token_ids": [0, 2, 5], "min_p": 0.01}])
def test_filtered_probs_are_what_the_sampler_draws_from(filters):
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0, -5.0]])
    params = SamplingParams(**filters)
    probs = filtered_probs(logits, [params])[0].double()
    rows = [SamplingRow(params, [1], 1, seed) for seed in range(DRAWS)]
    tokens = Sampler().sample(logits.repeat(DRAWS, 1), rows).output().token_ids
    assert all(probs[t] > 0 for t in tokens)
    assert chi_square_p_value(tokens, probs) > ALPHA


def continuations(llm: LLM, params: SamplingParams, seeds: range) -> list[tuple[int, ...]]:
    prompt = [5, 6, 7, 8, 9, 5, 6]
    return [tuple(out.outputs[0].token_ids) for out in llm.generate(
        [prompt] * len(seeds), [params.model_copy(update={"seed": s}) for s in seeds])]


def homogeneity_p_value(table: torch.Tensor) -> float:
    """Pearson's chi-square test that the rows of a table of counts come from one distribution."""
    table = table[:, table.sum(dim=0) > 0]
    expected = table.sum(dim=1, keepdim=True) * table.sum(dim=0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    degrees = (table.shape[0] - 1) * (table.shape[1] - 1)
    return torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2).item()


def test_draft_model_sampling_cannot_be_told_from_plain_sampling(tiny_checkpoints, drafts):
    """Three-token continuations over many seeds, with and without a draft model's proposals:
    a chi-square test of the two tables of counts; the same seeds give the same tokens again."""
    engine = {"device": "cpu", "num_kv_blocks": 1200, "max_model_len": 64, "max_num_seqs": 512}
    plain = LLM(str(tiny_checkpoints["llama"]), **engine)
    speculative = LLM(str(tiny_checkpoints["llama"]), **engine, speculative=draft_method(drafts["llama"], k=2))
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    seeds = range(1000)
    drawn = continuations(speculative, params, seeds)
    counts = [Counter(continuations(plain, params, seeds)), Counter(drawn)]
    cells = sorted(set(counts[0]) | set(counts[1]), key=lambda c: counts[0][c] + counts[1][c], reverse=True)
    common = [c for c in cells if counts[0][c] + counts[1][c] >= 10]
    table = [[counts[i][c] for c in common] + [sum(counts[i][c] for c in cells if c not in common)] for i in (0, 1)]
    assert homogeneity_p_value(torch.tensor(table, dtype=torch.float64)) > ALPHA
    stats = speculative.engine.stats().speculative
    assert 0 < stats.accepted < stats.proposed
    assert continuations(speculative, params, seeds[:50]) == drawn[:50]


def assert_reference_counts_agree(kv) -> None:
    """Each block is referenced once per live block table holding it, and free when none does."""
    refs = Counter(block_id for table in kv.block_tables.values() for block_id in table)
    for block in kv.pool.blocks:
        assert block.ref_count == refs[block.block_id]
        assert (block in kv.pool.free_queue) == (block.ref_count == 0)


def test_no_block_leaks_after_mixed_speculative_and_plain_traffic_with_aborts(tiny_checkpoints, drafts):
    engine = LLM(str(tiny_checkpoints["llama"]), **TINY_POOL, speculative=draft_method(drafts["llama"])).engine
    greedy = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    mixed = [greedy, greedy.model_copy(update={"speculative": False}),
             SamplingParams(temperature=0.8, n=2, max_tokens=25, ignore_eos=True, seed=3),
             SamplingParams(temperature=0.8, max_tokens=25, ignore_eos=True, repetition_penalty=1.2)]
    for i, prompt in enumerate(PROMPTS * 2):
        engine.add_request(f"r{i}", prompt, mixed[i % len(mixed)])
    for step in range(12):
        engine.step()
        assert_reference_counts_agree(engine.kv)
        if step in (4, 8):
            engine.abort_request(f"r{step}")
            engine.abort_request(f"r{step + 1}")
    while engine.has_unfinished_requests():
        engine.step()
        assert_reference_counts_agree(engine.kv)
    assert engine.stats().num_preemptions > 0 and engine.stats().speculative.accepted > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.kv.seq_blocks
