"""Several base models in one cluster behind one ingress: the config shape, and two tiny models
served on a real local Ray, each answering like its own Hugging Face model."""

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from kvserve.cluster.app import build_cluster_apps
from kvserve.cluster.config import ConfigError, parse_cluster_config
from kvserve.cluster.deploy import deploy_cluster
from kvserve.cluster.validate import validate_file
from kvserve.workers.models.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "cpu-two-models.yaml"
ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "cpu_threads": 1}
ARCHS = ("llama", "qwen2")
PROMPTS = ("The quick brown fox", "Once upon a time")
MAX_TOKENS = 8


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_models_inherit_the_top_level_serving():
    cluster = parse_cluster_config(example())
    llama, qwen = cluster.models
    assert cluster.served_model_names() == ["tiny-llama", "tiny-qwen2"]
    assert (llama.serving.replicas, llama.serving.router, llama.serving.router_options.load_cost_tokens) == (2, "kv", 32)
    assert (qwen.serving.replicas, qwen.serving.router) == (1, "round_robin")
    assert llama.serving.replica_cpus == qwen.serving.replica_cpus == 0.5


def test_each_model_takes_its_own_engine_s_batch_by_default():
    config = example()
    config["serving"].pop("max_ongoing_requests", None)
    config["models"][0]["engine"]["max_num_seqs"] = 12
    config["models"][1]["serving"]["max_ongoing_requests"] = 5
    llama, qwen = parse_cluster_config(config).models
    assert (llama.serving.max_ongoing_requests, qwen.serving.max_ongoing_requests) == (12, 5)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["models"][1]["serving"].update(port=9000), r"models\[1\]\.serving: \['port'\] apply to the whole"),
    (lambda c: c["models"][1]["serving"].update(served_model_name="tiny-llama"), "served twice"),
    (lambda c: c["models"][0]["serving"].update(replicas=0), r"models\[0\]\.serving\.replicas"),
    (lambda c: c.update(models=[]), "models"),
])
def test_bad_cluster_configs_name_the_key(edit, message):
    config = example()
    edit(config)
    with pytest.raises(ConfigError, match=message):
        parse_cluster_config(config)


def test_validate_checks_each_model(tmp_path, tiny_checkpoints):
    config = example()
    config["models"][0]["engine"]["model"] = str(tiny_checkpoints["llama"])
    config["models"][1]["engine"].update(model=str(tiny_checkpoints["qwen2"]), max_model_len=10**6)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    kinds, problems = validate_file(path)
    assert kinds == ["kvserve"]
    assert len(problems) == 1 and problems[0].startswith("models[1].engine.max_model_len:")


def test_serve_config_needs_an_application_per_model(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "two-models.serve.yaml").read_text())
    del config["applications"][0]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    _, problems = validate_file(path)
    assert problems == ["applications[1].args.models[0]: the model 'tiny-llama' needs an application named "
                        "'kvserve-tiny-llama' with import_path kvserve.cluster.app:model_app_builder"]


# -- two models on a local Ray --------------------------------------------------------------------


def model_entry(checkpoint: Path, router: str) -> dict:
    return {"engine": {**ENGINE, "model": str(checkpoint)}, "serving": {"router": router}}


@pytest.fixture(scope="module")
def cluster_raw(tiny_checkpoints) -> dict:
    models = [model_entry(tiny_checkpoints[arch], router) for arch, router in zip(ARCHS, ("kv", "round_robin"))]
    return {"serving": {"app_name": "several", "port": free_port(), "replica_cpus": 0.5}, "models": models}


@pytest.fixture(scope="module")
def cluster_config(cluster_raw):
    return parse_cluster_config(cluster_raw)


@pytest.fixture(scope="module")
def server(cluster_config, ray_of, until_ready):
    serving = cluster_config.serving
    with ray_of(3):
        serve.start(http_options={"host": "127.0.0.1", "port": serving.port})
        deploy_cluster(build_cluster_apps(cluster_config), cluster_config)
        base = f"http://127.0.0.1:{serving.port}"
        until_ready(base)
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def hf_greedy(model_dir: str, prompt: str) -> tuple[list[str], str]:
    """Each new token's text, and the whole text, of transformers' greedy continuation."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    config = GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None)
    with torch.inference_mode():
        new = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:]
    return [tokenizer.decode([t]) for t in new.tolist()], tokenizer.decode(new)


def test_models_lists_both(client):
    assert [m.id for m in client.models.list().data] == list(ARCHS)


def test_each_model_answers_like_its_hf_model(client, tiny_checkpoints):
    for arch in ARCHS:
        for prompt in PROMPTS:
            got = client.completions.create(model=arch, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            logprobs=0, extra_body={"ignore_eos": True})
            tokens, text = hf_greedy(str(tiny_checkpoints[arch]), prompt)
            assert got.model == arch
            assert got.choices[0].logprobs.tokens == tokens, (arch, prompt)
            # The text holds back trailing bytes that do not make a whole character yet.
            assert text.startswith(got.choices[0].text)


def test_unknown_model_is_a_404_naming_the_served_ones(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    body = error.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "'gpt-4'" in body["message"] and "'llama', 'qwen2'" in body["message"]


def test_each_model_has_its_own_kv_index_and_labelled_metrics(server, client):
    client.completions.create(model="qwen2", prompt="Hello", max_tokens=2, temperature=0)
    deadline = time.monotonic() + 10
    while not all((ready := httpx.get(f"{server}/ready").json())["models"][name]["replicas"] for name in ARCHS):
        assert time.monotonic() < deadline, ready  # the followers have not heard from each model's replica yet
        time.sleep(0.25)
    assert {name: info["running_replicas"] for name, info in ready["models"].items()} == {"llama": 1, "qwen2": 1}
    llama, qwen = (set(ready["models"][name]["replicas"]) for name in ARCHS)
    assert len(llama) == len(qwen) == 1 and not llama & qwen
    text = httpx.get(f"{server}/metrics").text
    (qwen_replica,) = qwen
    assert f'kvserve_replica_model{{model="qwen2",replica="{qwen_replica}"}} 1.0' in text
    assert 'kvserve_requests_total{model="qwen2",replica=' in text




class StreamingClient:
    """Streams one prompt to one model until stopped; a refusal (503, a dropped connection) is
    retried and counted, anything else, or another text than the first, is a failure."""

    def __init__(self, client: openai.OpenAI, model: str):
        self.client, self.model = client, model
        self.texts: list[str] = []
        self.refusals: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                chunks = self.client.completions.create(model=self.model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True})
                text = "".join(c.choices[0].text for c in chunks if c.choices)
            except (openai.APIConnectionError, openai.InternalServerError) as error:
                self.refusals.append(repr(error))
                continue
            except Exception as error:
                self.failures.append(repr(error))
                continue
            if self.texts and text != self.texts[0]:
                self.failures.append(f"got {text!r}, first {self.texts[0]!r}")
            self.texts.append(text)

    def wait_for(self, more: int, timeout_s: float = 60) -> None:
        target, deadline = len(self.texts) + more, time.monotonic() + timeout_s
        while len(self.texts) < target:
            assert time.monotonic() < deadline and not self.failures, self.failures
            time.sleep(0.2)


def redeploy(apps: dict, names: list[str], ingress: str) -> None:
    """`names` of `apps` deployed again, as `serve deploy` does for the applications whose config changed."""
    for name in names:
        serve.run(apps[name], name=name, route_prefix="/" if name == ingress else None)


def followed_replicas(server: str, model: str) -> list[str]:
    return httpx.get(f"{server}/ready").json()["models"].get(model, {}).get("replicas", [])


def test_adding_and_removing_a_model_leaves_the_others_serving(server, client, cluster_raw, tiny_checkpoints):
    ingress = cluster_raw["serving"]["app_name"]
    llama_replicas = followed_replicas(server, "llama")
    grown = parse_cluster_config({**cluster_raw, "models": [*cluster_raw["models"],
                                                            model_entry(tiny_checkpoints["mistral"], "pow2")]})
    streamer = StreamingClient(client, "llama")
    thread = threading.Thread(target=streamer.run, daemon=True)
    thread.start()
    try:
        streamer.wait_for(2)
        redeploy(build_cluster_apps(grown), [f"{ingress}-mistral", ingress], ingress)
        assert [m.id for m in client.models.list().data] == [*ARCHS, "mistral"]
        assert client.completions.create(model="mistral", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        streamer.wait_for(2)
        redeploy(build_cluster_apps(parse_cluster_config(cluster_raw)), [ingress], ingress)
        serve.delete(f"{ingress}-mistral")
        assert [m.id for m in client.models.list().data] == list(ARCHS)
        streamer.wait_for(2)
    finally:
        streamer.stop.set()
        thread.join(timeout=60)
    assert not streamer.failures, streamer.failures
    assert followed_replicas(server, "llama") == llama_replicas  # never restarted
    print(f"\nstreamed {len(streamer.texts)} completions, {len(streamer.refusals)} refused: {streamer.refusals}")
