"""Tensor parallelism on CPU: two gloo ranks as Ray actors against the in-process engine, and LoRA
adapters on the ranks against Hugging Face with the PEFT adapter merged."""

import argparse
import os
import random
import shutil
import signal
import socket
import time

import httpx
import pytest
import ray
from ray import serve
from ray._private import state as ray_state
from ray.util import placement_group_table
from test_lora import ADAPTERS, MergedReference, assert_matches_reference, save_adapters, tokens_of
from test_lora import greedy as lora_greedy
from test_lora import prompts as lora_prompts

from kvserve.cluster.bench import tp as bench_tp
from kvserve.cluster.app import build_app
from kvserve.cluster.cli import build_parser, config_overrides, main
from kvserve.cluster.config import load_config
from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.workers.models.distributed import _ephemeral_ports, free_port
from kvserve.workers.llm import LLM
from kvserve.workers.engine.sampling_params import SamplingParams

ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256}
LORA_ENGINE = {"enable_lora": True, "max_lora_rank": 8, "block_size": 8}
LORA_ARCHS = ("llama", "qwen2", "llama-kv1")


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_of):
    with ray_of(6):
        yield


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    """The suite's Llama and Qwen2 (4 heads, 2 KV heads), a Llama with one KV head, and one whose
    vocabulary (513: a token added to the 512 of the tokenizer) does not split over 2 ranks."""
    root = tmp_path_factory.mktemp("tp")
    kv1 = build_tiny_checkpoint(root / "llama-kv1", "llama", num_key_value_heads=1)
    odd_vocab = build_tiny_checkpoint(root / "llama-vocab513", "llama", vocab_size=513)
    return {"llama": tiny_checkpoints["llama"], "qwen2": tiny_checkpoints["qwen2"], "llama-kv1": kv1,
            "llama-vocab513": odd_vocab}


def prompts(seed: int = 0) -> list[list[int]]:
    """Mixed lengths, two of them sharing a prefix longer than a block."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(3, 500) for _ in range(n)]  # noqa: E731
    prefix = words(20)
    return [words(n) for n in (3, 9, 17, 40)] + [prefix + words(4), prefix + words(7)]


def tp_engine(model_dir, **options) -> LLM:
    return LLM(str(model_dir), **{**ENGINE, "tp_size": 2, **options})


def generate(llm: LLM, params: SamplingParams) -> list[list[list[int]]]:
    return [[o.token_ids for o in out.outputs] for out in llm.generate(prompts(), params)]


def live_placement_groups() -> list[str]:
    return [pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"]


def test_a_free_port_is_bindable_and_never_one_the_kernel_hands_out_itself():
    """Servers and rendezvous bind the port some time after it is picked: one from the
    ephemeral range could meanwhile become an outgoing connection's source port."""
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and not ports & set(_ephemeral_ports())
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("", port))


@pytest.mark.parametrize(
    "arch, workers",
    [("llama", {}), ("qwen2", {}), ("llama-kv1", {}), ("llama-vocab513", {}),
     ("llama", {"tp_size": 1, "distributed_executor_backend": "ray"})],
    ids=["llama", "qwen2", "llama-kv1", "llama-vocab513", "llama-tp1-on-a-worker"],
)
def test_worker_actors_give_the_in_process_greedy_tokens(arch, workers, checkpoints):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = generate(LLM(str(checkpoints[arch]), **ENGINE), greedy)
    llm = tp_engine(checkpoints[arch], **workers)
    try:
        assert generate(llm, greedy) == expected
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def lora_folders(checkpoints, tmp_path_factory) -> dict[str, dict[str, str]]:
    """arch -> test_lora's adapters of that checkpoint: name -> folder."""
    root = tmp_path_factory.mktemp("tp-lora")
    return {arch: save_adapters(checkpoints[arch], root / arch) for arch in LORA_ARCHS}


@pytest.fixture(scope="module")
def lora_references(checkpoints, lora_folders) -> dict[str, MergedReference]:
    return {arch: MergedReference(checkpoints[arch], lora_folders[arch]) for arch in LORA_ARCHS}


@pytest.mark.parametrize(
    "arch, workers",
    [("llama", {}), ("qwen2", {}), ("llama-kv1", {}), ("llama", {"tp_size": 1, "distributed_executor_backend": "ray"})],
    ids=["llama", "qwen2", "llama-kv1", "llama-tp1-on-a-worker"],
)
def test_lora_adapters_on_worker_actors_match_hf_merged(arch, workers, checkpoints, lora_folders, lora_references):
    """Every adapter and the base in one batch, twice as many adapters as slots: the engine's
    process swaps them in and out of the slots, each rank writing its shard of them."""
    names = [None, *ADAPTERS]
    batch_prompts = lora_prompts(2 * len(names))
    loras = names * 2
    llm = tp_engine(checkpoints[arch], **LORA_ENGINE, lora_modules=lora_folders[arch], max_loras=2, max_cpu_loras=2,
                    **workers)
    try:
        got = tokens_of(llm.generate(batch_prompts, lora_greedy(), lora=loras))
        assert llm.engine.runner.lora_slots.num_slot_loads >= len(ADAPTERS)
    finally:
        llm.engine.shutdown()
    for prompt, lora, tokens in zip(batch_prompts, loras, got):
        assert_matches_reference(lora_references[arch], prompt, lora, tokens)


def test_lora_adapters_added_and_removed_at_run_time_reach_every_rank(checkpoints, lora_folders, lora_references):
    folders, reference = lora_folders["qwen2"], lora_references["qwen2"]
    prompt = lora_prompts(1, seed=5)[0]
    llm = tp_engine(checkpoints["qwen2"], **LORA_ENGINE, max_loras=1)

    def under(lora: str) -> list[int]:
        return tokens_of(llm.generate(prompt, lora_greedy(), lora=lora))[0]

    try:
        llm.engine.add_lora("late", folders["qv"])
        qv_tokens = under("late")
        assert llm.engine.stats().lora_adapters == ("late",)
        llm.engine.add_lora("late", folders["mlp"])  # the ranks drop their copy of qv's weights
        mlp_tokens = under("late")
        llm.engine.remove_lora("late")
        assert llm.engine.stats().lora_adapters == ()
        with pytest.raises(ValueError, match="unknown LoRA adapter 'late'"):
            under("late")
    finally:
        llm.engine.shutdown()
    assert_matches_reference(reference, prompt, "qv", qv_tokens)
    assert_matches_reference(reference, prompt, "mlp", mlp_tokens)


@pytest.fixture(scope="module")
def quantized_checkpoints(tmp_path_factory):
    """One tiny Llama quantized in every format: compressed-tensors FP8 and int4, GPTQ, AWQ, GGUF."""
    from gguf import GGMLQuantizationType

    from gguf_writer import write_gguf
    from test_quantization import SHAPE, rewrite_int4, write_compressed_tensors

    root = tmp_path_factory.mktemp("tp-quantized")
    base = build_tiny_checkpoint(root / "llama", "llama", **SHAPE)
    int4 = write_compressed_tensors(base, root / "W4A16_ASYM", "W4A16_ASYM")
    (root / "gguf").mkdir()
    return {
        "FP8_DYNAMIC": write_compressed_tensors(base, root / "FP8_DYNAMIC", "FP8_DYNAMIC"),
        "W4A16_ASYM": int4,
        "gptq": rewrite_int4(int4, root / "gptq", "gptq"),
        "awq": rewrite_int4(int4, root / "awq", "awq"),
        "gguf-Q4_0": write_gguf(base, root / "gguf" / "tiny.gguf", "llama", GGMLQuantizationType.Q4_0),
    }


def test_quantized_checkpoints_give_the_in_process_greedy_tokens_on_two_ranks(quantized_checkpoints):
    """Each rank holds its slices of the packed weights, scales and zero points."""
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for fmt, path in quantized_checkpoints.items():
        expected = generate(LLM(str(path), **ENGINE), greedy)
        llm = tp_engine(path)
        try:
            assert generate(llm, greedy) == expected, fmt
        finally:
            llm.engine.shutdown()


def test_seeded_samples_on_rank_0_equal_the_in_process_ones(checkpoints):
    """Rank 0 samples: a seeded sample's draws depend on its seed and position alone, so
    nothing but the plan has to travel to the rank for them to equal the in-process ones."""
    seeded = SamplingParams(temperature=0.8, max_tokens=6, n=2, seed=7, ignore_eos=True)
    expected = generate(LLM(str(checkpoints["llama"]), **ENGINE), seeded)
    llm = tp_engine(checkpoints["llama"])
    try:
        assert generate(llm, seeded) == expected
    finally:
        llm.engine.runner.shutdown()


def test_prompt_logprobs_on_two_ranks_equal_the_in_process_ones(checkpoints):
    """Every rank computes the scored positions' logits (the vocabulary is gathered across
    them, 513 tokens: one rank holds the odd one); rank 0 reads them, chunk by chunk."""
    scored = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    options = {"max_num_batched_tokens": 16}
    model = checkpoints["llama-vocab513"]
    expected = [out.prompt_logprobs for out in LLM(str(model), **ENGINE, **options).generate(prompts(), scored)]
    llm = tp_engine(model, **options)
    try:
        got = [out.prompt_logprobs for out in llm.generate(prompts(), scored)]
    finally:
        llm.engine.shutdown()
    for mine, theirs in zip(got, expected):
        assert mine[0] is None and len(mine) == len(theirs)
        for a, b in zip(mine[1:], theirs[1:]):
            assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank, [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_speculative_greedy_tokens_on_two_ranks_equal_the_plain_in_process_ones(checkpoints):
    greedy = SamplingParams(temperature=0.0, n=2, max_tokens=12, ignore_eos=True)
    repeating = [[5, 6, 7, 8, 9] * 4, [30, 31, 32, 30, 31, 32, 30]]
    expected = [[o.token_ids for o in out.outputs] for out in LLM(str(checkpoints["llama"]), **ENGINE).generate(repeating, greedy)]
    llm = tp_engine(checkpoints["llama"], speculative={"method": "ngram", "num_speculative_tokens": 3,
                                                       "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    try:
        assert [[o.token_ids for o in out.outputs] for out in llm.generate(repeating, greedy)] == expected
        assert llm.engine.stats().speculative.accepted > 0
    finally:
        llm.engine.shutdown()


def test_draft_model_tokens_on_two_ranks_equal_the_plain_in_process_ones(checkpoints):
    """The draft model runs whole in the engine's process; rank 0 verifies its proposals, with
    their distributions for sampled requests shipped with the step (seeded: the same tokens twice)."""
    greedy = SamplingParams(temperature=0.0, n=2, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=12, ignore_eos=True)
    expected = generate(LLM(str(checkpoints["llama"]), **ENGINE), greedy)
    llm = tp_engine(checkpoints["llama"], speculative={"method": "draft", "model": str(checkpoints["llama"]),
                                                        "num_speculative_tokens": 3})
    try:
        assert generate(llm, greedy) == expected
        assert generate(llm, seeded) == generate(llm, seeded)
        assert llm.engine.stats().speculative.accepted > 0
    finally:
        llm.engine.shutdown()


def test_unshardable_tp_size_is_named(checkpoints):
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tp_size 3"):
        LLM(str(checkpoints["llama"]), **ENGINE, tp_size=3)


def test_rank_failing_to_start_leaves_nothing_behind(checkpoints, tmp_path):
    broken = shutil.copytree(checkpoints["llama"], tmp_path / "broken")
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    before = live_placement_groups()
    with pytest.raises(ValueError, match=r"tensor-parallel rank \d failed to start"):
        tp_engine(broken)
    assert live_placement_groups() == before


def test_killed_rank_fails_the_next_step(checkpoints):
    llm = tp_engine(checkpoints["llama"])
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts(), params)
    before = live_placement_groups()
    ray.kill(llm.engine.runner.workers[1])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"tensor-parallel rank \d failed during a step"):
        llm.generate(prompts(seed=1), params)
    assert time.monotonic() - started < 30
    assert len(live_placement_groups()) == len(before) - 1


def test_generate_with_tp2_prints_what_tp1_does(checkpoints, capsys):
    def run(tp: str) -> str:
        assert main(["generate", "--model", str(checkpoints["qwen2"]), "--device", "cpu", "--tp", tp,
                     "--prompt", "The quick brown fox", "--max-tokens", "6", "--json"]) == 0
        return capsys.readouterr().out

    before = live_placement_groups()
    assert run("2") == run("1")
    assert live_placement_groups() == before


def test_serve_flag_sets_engine_tp_size(checkpoints):
    args = build_parser().parse_args(["serve", "--model", str(checkpoints["llama"]), "--tp", "2"])
    assert load_config(None, config_overrides(args)).engine.tp_size == 2


def test_bench_tp_reports_both_step_times(checkpoints, capsys):
    before = live_placement_groups()
    args = argparse.Namespace(tp=2, batch=2, prompt_len=8, steps=2, json=None)
    assert bench_tp.main(args, str(checkpoints["llama"]), ENGINE) == 0
    out = capsys.readouterr().out
    assert "in-process, tp 1:" in out and "worker actors, tp 2:" in out and "add" in out
    assert live_placement_groups() == before


@pytest.fixture(scope="module")
def served(checkpoints):
    """Two tp-2 replicas behind round robin, so that both serve."""
    model = str(checkpoints["llama"])
    port = free_port()
    config = load_config(None, {
        "engine": {**ENGINE, "model": model, "tp_size": 2},
        "serving": {"app_name": "tptest", "replicas": 2, "router": "round_robin", "port": port,
                    "replica_cpus": 0},
    })
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name="tptest", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while len(replica_ids((url, None))) < 2:
            assert time.monotonic() < deadline, "the replicas never reported to the router"
            time.sleep(0.5)
        yield url, config.served_model_name()
    finally:
        serve.shutdown()
    deadline = time.monotonic() + 30  # the replicas' placement groups go with them, soon after
    while live_placement_groups():
        assert time.monotonic() < deadline, "a tp replica's placement group outlived it"
        time.sleep(0.5)


def complete(served, prompt: str, timeout: float = 60) -> httpx.Response:
    url, model = served
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def test_served_completions_with_tp2_equal_the_offline_engine(served, checkpoints):
    expected = LLM(str(checkpoints["llama"]), **ENGINE).generate(
        "The quick brown fox", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    answers = [complete(served, "The quick brown fox") for _ in range(4)]
    assert {a.headers["x-kvserve-replica"] for a in answers} == set(replica_ids(served))
    assert [a.json()["choices"][0]["text"] for a in answers] == [expected] * 4
    # The ranks live in their replica's placement group: the two replicas' and no others.
    assert len(live_placement_groups()) == 2


def test_killed_rank_gets_its_replica_replaced(served):
    before = set(replica_ids(served))
    os.kill(rank_pids()[0], signal.SIGKILL)
    started = time.monotonic()
    served_by: set[str] = set()
    seen: list = []
    while not (served_by - before and len(replica_ids(served)) == 2):
        assert time.monotonic() - started < 150, f"no replacement replica; served by {served_by}, saw {seen}"
        answer = complete(served, "The quick brown fox", timeout=30)
        if answer.status_code == 200:
            served_by.add(answer.headers["x-kvserve-replica"])
        else:  # a request that reached the broken replica before Serve replaced it
            assert answer.status_code >= 500 and "error" in answer.json()
        seen.append((round(time.monotonic() - started), answer.status_code, replica_ids(served)))
        time.sleep(0.5)
    assert served_by & before, "the healthy replica stopped serving meanwhile"
    assert len(rank_pids()) == 4


def replica_ids(served) -> list[str]:
    return httpx.get(f"{served[0]}/ready", timeout=10).json()["replicas"]


def rank_pids() -> list[int]:
    return [actor["Pid"] for actor in ray_state.actors().values()
            if actor["ActorClassName"] == "TPWorker" and actor["State"] == "ALIVE"]
