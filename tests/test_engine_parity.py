"""The engine's greedy tokens against Hugging Face transformers `generate`, token for token,
under every scheduling condition that changes how the work is cut up."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from kvserve.workers.engine.bad_words import bad_word_token_ids
from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
MAX_TOKENS = 10
NEAR_TIE = 1e-4


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """20 prompts of mixed lengths; some share a 40-token prefix, some a 17-token one."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    long_prefix, short_prefix = words(40), words(17)
    prompts = [words(rng.randint(2, 70)) for _ in range(10)]
    prompts += [long_prefix + words(rng.randint(1, 20)) for _ in range(6)]
    prompts += [short_prefix + words(rng.randint(0, 5)) for _ in range(3)]
    prompts.append(long_prefix[:32])  # ends exactly on a block boundary
    return prompts


class HFReference:
    """Greedy continuations and per-step logits from transformers, computed once per model."""

    def __init__(self, model_dir):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.config = GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None)
        self.cache: dict[tuple, tuple[list[int], torch.Tensor]] = {}

    def generate(self, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
        key = tuple(prompt)
        if key not in self.cache:
            with torch.inference_mode():
                out = self.model.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    generation_config=self.config,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            tokens = out.sequences[0, len(prompt):].tolist()
            self.cache[key] = tokens, torch.cat(out.logits)
        return self.cache[key]


@pytest.fixture(scope="module")
def hf_refs(tiny_checkpoints):
    return {arch: HFReference(tiny_checkpoints[arch]) for arch in ARCHS}


def assert_matches_hf(ref: HFReference, prompts, outputs) -> None:
    for prompt, output in zip(prompts, outputs):
        expected, logits = ref.generate(prompt)
        got = output.outputs[0].token_ids
        assert len(got) == MAX_TOKENS
        for step, (a, b) in enumerate(zip(got, expected)):
            if a == b:
                continue
            top2 = logits[step].topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap < NEAR_TIE, f"token {step} differs ({a} vs HF {b}) and HF's top-2 gap is {gap}"
            break  # after a legitimate near-tie the continuations may part ways


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def engine_for(model_dir, **options) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", **options)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_hf(arch, tiny_checkpoints, hf_refs):
    llm = engine_for(tiny_checkpoints[arch])
    prompts = make_prompts(llm.engine.vocab_size)
    outputs = llm.generate(prompts, greedy())
    assert_matches_hf(hf_refs[arch], prompts, outputs)
    assert outputs[11].num_cached_tokens >= 32  # shared 40-token prefix, after the first


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"enable_prefix_caching": False}, id="no-prefix-cache"),
        pytest.param({"max_num_batched_tokens": 7}, id="tiny-chunked-prefill"),
        pytest.param({"num_kv_blocks": 40, "max_model_len": 128}, id="preempting-pool"),
        pytest.param({"max_num_seqs": 3, "block_size": 8}, id="few-seqs-block-8"),
    ],
)
def test_same_tokens_under_scheduling_pressure(options, tiny_checkpoints, hf_refs):
    llm = engine_for(tiny_checkpoints["llama"], **options)
    prompts = make_prompts(llm.engine.vocab_size)
    outputs = llm.generate(prompts, greedy())
    assert_matches_hf(hf_refs["llama"], prompts, outputs)
    if "num_kv_blocks" in options:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_logit_bias_equals_hf_sequence_bias(tiny_checkpoints, hf_refs):
    """OpenAI's logit_bias is transformers' `sequence_bias` of one-token sequences."""
    llm = engine_for(tiny_checkpoints["llama"])
    prompts = make_prompts(llm.engine.vocab_size)[:6]
    plain = [output.outputs[0].token_ids for output in llm.generate(prompts, greedy())]
    bias = {plain[0][0]: -100.0, plain[1][2]: 2.5, 7: 1.5, 11: -3.0}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logit_bias=bias)
    config = GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None,
                              sequence_bias={(token,): value for token, value in bias.items()})
    model = hf_refs["llama"].model
    for prompt, output in zip(prompts, llm.generate(prompts, params)):
        with torch.inference_mode():
            expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      generation_config=config)
        assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] != plain


def test_allowed_token_ids_equal_hf_prefix_allowed_tokens(tiny_checkpoints, hf_refs):
    """vLLM's allowed_token_ids is transformers' `prefix_allowed_tokens_fn` with one list for
    every step; greedy, and with the repetition penalty after the mask."""
    llm = engine_for(tiny_checkpoints["llama"])
    prompts = make_prompts(llm.engine.vocab_size)[:6]
    allowed = [7, 11, 19, 23, 101, 257, 300]
    model = hf_refs["llama"].model
    for extra in ({}, {"repetition_penalty": 1.5}):
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, allowed_token_ids=allowed,
                                **extra)
        config = GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None, **extra)
        for prompt, output in zip(prompts, llm.generate(prompts, params)):
            with torch.inference_mode():
                expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones_like(torch.tensor([prompt])),
                                          generation_config=config, prefix_allowed_tokens_fn=lambda batch, ids: allowed)
            assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist()
            assert set(output.outputs[0].token_ids) <= set(allowed)


def test_bad_words_equal_hf_bad_words_ids(tiny_checkpoints, hf_refs):
    """vLLM's bad_words, as token sequences, are transformers' `bad_words_ids` (greedy); the
    words are pieces of the unconstrained outputs, so the ban changes them."""
    llm = engine_for(tiny_checkpoints["llama"])
    tokenizer = llm.engine.tokenizer
    prompts = make_prompts(llm.engine.vocab_size)[:6]
    plain = [output.outputs[0].token_ids for output in llm.generate(prompts, greedy())]
    words = [tokenizer.decode(plain[0][1:2]), tokenizer.decode(plain[1][2:4]), tokenizer.decode(plain[2][:3])]
    words = [word for word in words if word.strip()]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, bad_words=words)
    banned = [list(ids) for ids in bad_word_token_ids(tokenizer, words)]
    config = GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None, bad_words_ids=banned)
    model = hf_refs["llama"].model
    outputs = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
    for prompt, got in zip(prompts, outputs):
        with torch.inference_mode():
            expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones_like(torch.tensor([prompt])),
                                      generation_config=config)
        assert got == expected[0, len(prompt):].tolist()
    assert outputs != plain


def test_requests_arriving_while_others_decode(tiny_checkpoints, hf_refs):
    llm = engine_for(tiny_checkpoints["qwen2"])
    engine = llm.engine
    prompts = make_prompts(engine.vocab_size, seed=3)
    finished = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, greedy())
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
    assert_matches_hf(hf_refs["qwen2"], prompts, [finished[f"r{i}"] for i in range(len(prompts))])
