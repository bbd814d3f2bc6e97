"""Speculative decoding over HTTP: a server proposing with n-gram lookup or a draft model answers
greedy requests, plain and streamed, with the tokens of the offline engine without speculation."""

import openai
import pytest

from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM
from test_speculative import noisy_copy

ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 128}
PROMPTS = ["The cat watches the cat watches the cat", "Once upon a time there was"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def draft_dir(tiny_checkpoints, tmp_path_factory):
    return noisy_copy(tiny_checkpoints["llama"], tmp_path_factory.mktemp("served") / "draft")


@pytest.fixture(scope="module", params=["ngram", "draft"])
def client(request, tiny_checkpoints, draft_dir, local_app):
    speculative = {"method": request.param, "num_speculative_tokens": 3}
    speculative.update({"model": str(draft_dir)} if request.param == "draft" else {"prompt_lookup_min": 1})
    with local_app({
        "engine": {**ENGINE, "model": str(tiny_checkpoints["llama"]), "speculative": speculative},
        "serving": {"app_name": "spectest", "replicas": 1, "replica_cpus": 1},
    }, num_cpus=3) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def expected(tiny_checkpoints) -> list[str]:
    plain = LLM(str(tiny_checkpoints["llama"]), **ENGINE)
    outputs = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [out.outputs[0].text for out in outputs]


def test_greedy_completions_equal_those_without_speculation(client, expected):
    model = client.models.list().data[0].id
    for prompt, want in zip(PROMPTS, expected):
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.choices[0].text == want
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want
