"""LoRA adapters over HTTP, vLLM's interface: an adapter's name as `model`, `/v1/models` listing
adapters under their base, and `/v1/load_lora_adapter` / `/v1/unload_lora_adapter` at run time;
greedy output under each adapter equals Hugging Face with the PEFT adapter merged."""

import httpx
import openai
import pytest
from test_lora import ADAPTERS, MAX_TOKENS, MergedReference, save_adapter
from transformers import AutoTokenizer

BASE = "tiny-llama"
STARTUP, RUNTIME = ("attn", "mlp"), "qv"
PROMPTS = ("The quick brown fox", "Once upon a time")


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora-serving")
    return {name: save_adapter(tiny_checkpoints["llama"], root / name, seed, **ADAPTERS[name])
            for seed, name in enumerate((*STARTUP, RUNTIME))}


@pytest.fixture(scope="module")
def server(tiny_checkpoints, folders, local_app):
    engine = {"model": str(tiny_checkpoints["llama"]), "device": "cpu", "dtype": "float32", "num_kv_blocks": 64,
              "max_model_len": 128, "block_size": 8, "cpu_threads": 1, "enable_lora": True, "max_loras": 2,
              "max_lora_rank": 8, "lora_modules": {name: folders[name] for name in STARTUP}}
    serving = {"app_name": "loratest", "served_model_name": BASE, "replicas": 2, "router": "round_robin",
               "replica_cpus": 0.5}
    with local_app({"engine": engine, "serving": serving}, num_cpus=4) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, folders):
    return MergedReference(tiny_checkpoints["llama"], folders)


def expected_text(reference: MergedReference, prompt: str, lora: str | None) -> str:
    tokenizer = AutoTokenizer.from_pretrained(reference.base_dir)
    ids = tokenizer.encode(prompt)
    tokens, _ = reference.generate(ids, lora)
    return tokenizer.decode(ids + tokens)[len(tokenizer.decode(ids)):]


def completion(client, model: str, prompt: str) -> str:
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
    return reply.choices[0].text


def test_each_adapter_and_the_base_match_hf_merged(client, reference):
    for lora in (None, *STARTUP):
        for prompt in PROMPTS:
            assert completion(client, lora or BASE, prompt) == expected_text(reference, prompt, lora), lora
    chat = client.chat.completions.create(model="attn", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=MAX_TOKENS, temperature=0)
    assert chat.model == "attn" and chat.usage.completion_tokens > 0


def test_models_lists_adapters_under_their_base(client, folders):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {BASE, *STARTUP}
    for name in STARTUP:
        assert (cards[name].parent, cards[name].root) == (BASE, folders[name])


def test_load_use_and_unload_at_run_time(server, client, reference, folders):
    loaded = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": RUNTIME, "lora_path": folders[RUNTIME]})
    assert loaded.status_code == 200, loaded.text
    assert any(card.id == RUNTIME and card.parent == BASE for card in client.models.list().data)
    want = expected_text(reference, PROMPTS[0], RUNTIME)
    assert [completion(client, RUNTIME, PROMPTS[0]) for _ in range(3)] == [want] * 3  # on both replicas

    unloaded = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": RUNTIME})
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError, match=f"'{RUNTIME}' does not exist.*'{BASE}', 'attn', 'mlp'"):
        completion(client, RUNTIME, PROMPTS[0])
    assert completion(client, BASE, PROMPTS[0]) == expected_text(reference, PROMPTS[0], None)


def test_a_startup_adapter_unloads_and_loads_again(server, client, reference, folders):
    name = STARTUP[1]
    unloaded = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": name})
    assert unloaded.status_code == 200, unloaded.text
    assert name not in {card.id for card in client.models.list().data}
    with pytest.raises(openai.NotFoundError, match=f"'{name}' does not exist"):
        completion(client, name, PROMPTS[1])

    loaded = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": folders[name]})
    assert loaded.status_code == 200, loaded.text
    want = expected_text(reference, PROMPTS[1], name)
    assert [completion(client, name, PROMPTS[1]) for _ in range(3)] == [want] * 3  # on both replicas


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("load", {"lora_name": "attn", "lora_path": "/x"}, 400, "'attn' has already been loaded"),
    ("load", {"lora_name": "new", "lora_path": "/nowhere"}, 400, "/nowhere has no adapter_config.json"),
    ("load", {"lora_name": "new"}, 400, "lora_path"),
    ("unload", {"lora_name": "nope"}, 404, "'nope' cannot be found"),
])
def test_bad_adapter_requests_get_clear_errors(server, path, body, status, message):
    reply = httpx.post(f"{server}/v1/{path}_lora_adapter", json=body)
    assert reply.status_code == status
    assert message in reply.json()["error"]["message"]


def test_embeddings_refuse_adapters(client):
    with pytest.raises(openai.BadRequestError, match="'attn' is a LoRA adapter"):
        client.embeddings.create(model="attn", input="hello")

