"""Embeddings from the decoder models against Hugging Face's: `AutoModel`'s last hidden state,
pooled and normalised the same way, for every architecture, single and batched, through
chunked prefill and the prefix cache."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello", "Once upon a time, in a land far away, there was"]


def hf_embeddings(model_dir, prompts: list[str], pooling: str, normalize: bool) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    vectors = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(ids).last_hidden_state[0]
        vector = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
        vectors.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    return vectors


@pytest.mark.parametrize("pooling,normalize", [("last", True), ("mean", False)])
def test_embeddings_equal_hugging_faces(tiny_checkpoints, pooling, normalize):
    for arch, model_dir in tiny_checkpoints.items():
        # Chunks of 8 tokens: the longer prompts are pooled over several steps.
        llm = LLM(str(model_dir), device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128,
                  max_num_batched_tokens=8, pooling=pooling, normalize_embeddings=normalize)
        expected = hf_embeddings(model_dir, PROMPTS, pooling, normalize)
        batched = llm.embed(PROMPTS)
        single = [llm.embed(prompt)[0] for prompt in PROMPTS]
        for got in (batched, single):
            for output, want in zip(got, expected, strict=True):
                torch.testing.assert_close(torch.tensor(output.embedding), want, atol=1e-5, rtol=0, msg=arch)
        llm.engine.shutdown()


def test_last_pooling_shares_the_prefix_cache_and_mean_pooling_reads_none(tiny_checkpoints):
    model_dir = str(tiny_checkpoints["llama"])
    prompt = list(range(10, 60))  # three full blocks of 16 tokens and a partial one
    last = LLM(model_dir, device="cpu", num_kv_blocks=64, max_model_len=128)
    last.generate([prompt], SamplingParams(max_tokens=2))
    first, again = last.embed([prompt, prompt[:-1] + [7]])
    assert first.num_cached_tokens == 48 and again.num_cached_tokens == 48
    assert last.engine.kv.num_free_blocks == last.engine.kv.num_blocks
    mean = LLM(model_dir, device="cpu", num_kv_blocks=64, max_model_len=128, pooling="mean")
    one, two = mean.embed([prompt]), mean.embed([prompt])
    assert one[0].embedding == two[0].embedding and two[0].num_cached_tokens == 0


def test_embedding_and_generation_requests_share_a_batch(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["qwen3"]), device="cpu", num_kv_blocks=64, max_model_len=128)
    [alone] = llm.embed(["Hello there"])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    [plain] = llm.generate(["Hello there"], params)
    llm.engine.add_embedding_request("mixed-embed", "Hello there")
    llm.engine.add_request("mixed-generate", "Hello there", params)
    outputs = {}
    while llm.engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in llm.engine.step() if o.finished)
    [mixed] = llm.engine.take_embeddings()
    assert mixed.embedding == pytest.approx(alone.embedding, abs=1e-6)
    assert outputs["mixed-generate"].outputs[0].token_ids == plain.outputs[0].token_ids
