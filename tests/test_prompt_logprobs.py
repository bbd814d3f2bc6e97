"""Prompt logprobs (vLLM's `prompt_logprobs`) against Hugging Face transformers: every prompt
token's logprob given the tokens before it, its rank and the most likely tokens there, however
the prompt's work is cut up (chunked prefill, a cached prefix, preemption, n samples)."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM

TOP = 3
TOLERANCE = 1e-4


def make_prompts(vocab: int) -> list[list[int]]:
    """12 prompts of 2 to 70 tokens; the last four share a 40-token prefix."""
    rng = random.Random(0)
    words = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    prefix = words(40)
    return [words(rng.randint(2, 70)) for _ in range(8)] + [prefix + words(rng.randint(1, 20)) for _ in range(4)]


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).eval()


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row p is the distribution of prompt token p + 1."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0, :-1]
    return logits.float().log_softmax(dim=-1)


def assert_prompt_logprobs_match(model, prompt: list[int], got) -> None:
    assert len(got) == len(prompt) and got[0] is None
    expected = hf_prompt_logprobs(model, prompt)
    for position, (entry, row) in enumerate(zip(got[1:], expected), start=1):
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(row[prompt[position]].item(), abs=TOLERANCE)
        assert entry.rank == int((row > row[prompt[position]] + TOLERANCE).sum()) + 1 or _near_tie(row, entry)
        top_values, top_ids = row.topk(TOP)
        assert [lp for _, lp in entry.top] == pytest.approx(top_values.tolist(), abs=TOLERANCE)
        for (token, _), expected_id, value in zip(entry.top, top_ids.tolist(), top_values.tolist()):
            assert token == expected_id or abs(row[token].item() - value) < TOLERANCE  # a tie may swap places


def _near_tie(row: torch.Tensor, entry) -> bool:
    """Whether another token's logprob is within the tolerance of the prompt token's."""
    return int((abs(row - entry.logprob) < TOLERANCE).sum()) > 1


def scored(max_tokens: int = 2, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=TOP, n=n)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"max_num_batched_tokens": 7}, id="tiny-chunked-prefill"),
        pytest.param({"num_kv_blocks": 16, "max_model_len": 128}, id="preempting-pool"),
    ],
)
def test_prompt_logprobs_equal_hf(options, tiny_checkpoints, hf_model):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", dtype="float32", **options)
    prompts = make_prompts(llm.engine.vocab_size)
    outputs = llm.generate(prompts, scored(max_tokens=10))
    for prompt, output in zip(prompts, outputs):
        assert_prompt_logprobs_match(hf_model, prompt, output.prompt_logprobs)
    if "num_kv_blocks" in options:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_a_cached_prefix_is_scored_all_the_same(tiny_checkpoints, hf_model):
    """A prompt whose prefix is cached is computed in full (its cached positions have no
    logits); the blocks it fills still serve requests that do not score their prompts."""
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", dtype="float32")
    prompt = make_prompts(llm.engine.vocab_size)[-1]  # 40 shared tokens and more
    plain = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    assert llm.generate([prompt], plain)[0].prompt_logprobs is None
    again = llm.generate([prompt], scored())[0]
    assert again.num_cached_tokens == 0
    assert_prompt_logprobs_match(hf_model, prompt, again.prompt_logprobs)
    assert llm.generate([prompt], plain)[0].num_cached_tokens >= 32


def test_samples_share_one_scoring_and_short_prompts(tiny_checkpoints, hf_model):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", dtype="float32")
    prompt = make_prompts(llm.engine.vocab_size)[0]
    output = llm.generate([prompt], scored(n=3))[0]
    assert len(output.outputs) == 3
    assert_prompt_logprobs_match(hf_model, prompt, output.prompt_logprobs)
    assert llm.generate([[5]], scored())[0].prompt_logprobs == [None]
    zero = llm.generate([prompt[:4]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert [entry.top for entry in zero[1:]] == [[], [], []]


def test_prompt_logprobs_out_of_range_are_refused():
    with pytest.raises(ValueError, match="prompt_logprobs must be in \\[0, 20\\]"):
        SamplingParams(prompt_logprobs=21)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prompt_logprobs_on_cuda_equal_the_cpu_ones(tiny_checkpoints):
    """Scored positions gathered on the device, sliced, with chunked prefill and a sample's
    own logprobs beside them in one step."""
    options = {"dtype": "float32", "max_num_batched_tokens": 16}
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=TOP, logprobs=2)
    prompts = make_prompts(500)
    cpu = LLM(str(tiny_checkpoints["llama"]), device="cpu", **options).generate(prompts, params)
    cuda = LLM(str(tiny_checkpoints["llama"]), device="cuda", **options).generate(prompts, params)
    for mine, theirs in zip(cuda, cpu):
        assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b in zip(mine.prompt_logprobs[1:], theirs.prompt_logprobs[1:]):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-3)
