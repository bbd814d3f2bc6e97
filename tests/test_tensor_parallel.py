"""Tensor parallelism on CPU: two gloo ranks as Ray actors against the in-process engine."""

import argparse
import random
import shutil
import time

import httpx
import pytest
import ray
from ray import serve
from ray.util import placement_group_table

from kvserve.cluster import bench_tp
from kvserve.cluster.app import build_app
from kvserve.cluster.cli import _config_overrides, build_parser
from kvserve.cluster.config import load_config
from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.workers.distributed import free_port
from kvserve.workers.llm import LLM
from kvserve.workers.sampling_params import SamplingParams

ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """A local Ray, or the one another test module of this run has started already."""
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    """The suite's Llama and Qwen2 (4 heads, 2 KV heads) and a Llama with one KV head."""
    kv1 = build_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "llama-kv1", "llama", num_key_value_heads=1)
    return {"llama": tiny_checkpoints["llama"], "qwen2": tiny_checkpoints["qwen2"], "llama-kv1": kv1}


def prompts(seed: int = 0) -> list[list[int]]:
    """Mixed lengths, two of them sharing a prefix longer than a block."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(3, 500) for _ in range(n)]  # noqa: E731
    prefix = words(20)
    return [words(n) for n in (3, 9, 17, 40)] + [prefix + words(4), prefix + words(7)]


def tp_engine(model_dir, **options) -> LLM:
    return LLM(str(model_dir), **ENGINE, tp_size=2, **options)


def generate(llm: LLM, params: SamplingParams) -> list[list[list[int]]]:
    return [[o.token_ids for o in out.outputs] for out in llm.generate(prompts(), params)]


def live_placement_groups() -> list[str]:
    return [pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-kv1"])
def test_tp2_greedy_tokens_equal_tp1(arch, checkpoints):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = generate(LLM(str(checkpoints[arch]), **ENGINE), greedy)
    llm = tp_engine(checkpoints[arch])
    try:
        assert generate(llm, greedy) == expected
    finally:
        llm.engine.runner.shutdown()


def test_seeded_samples_follow_the_generator_across_steps(checkpoints):
    """Rank 0 samples; the generators' advanced state must come back for the next step."""
    seeded = SamplingParams(temperature=0.8, max_tokens=6, n=2, seed=7, ignore_eos=True)
    expected = generate(LLM(str(checkpoints["llama"]), **ENGINE), seeded)
    llm = tp_engine(checkpoints["llama"])
    try:
        assert generate(llm, seeded) == expected
    finally:
        llm.engine.runner.shutdown()


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


def test_serve_flag_sets_engine_tp_size(checkpoints):
    args = build_parser().parse_args(["serve", "--model", str(checkpoints["llama"]), "--tp", "2"])
    assert load_config(None, _config_overrides(args)).engine.tp_size == 2


def test_served_completion_with_tp2_equals_the_offline_engine(checkpoints):
    model = str(checkpoints["llama"])
    port = free_port()
    config = load_config(None, {
        "engine": {**ENGINE, "model": model, "tp_size": 2},
        "serving": {"app_name": "tptest", "port": port, "replica_cpus": 0},
    })
    expected = LLM(model, **ENGINE).generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=8))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name="tptest", route_prefix="/")
        body = {"model": config.served_model_name(), "prompt": "The quick brown fox", "max_tokens": 8,
                "temperature": 0}
        got = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == expected[0].outputs[0].text
    finally:
        serve.shutdown()
    deadline = time.monotonic() + 30  # the replica's placement group goes with it, soon after
    while live_placement_groups():
        assert time.monotonic() < deadline, "the tp ranks' placement group outlived the replica"
        time.sleep(0.5)


def test_bench_tp_reports_both_step_times(checkpoints, capsys):
    args = argparse.Namespace(tp=2, batch=2, prompt_len=8, steps=2)
    assert bench_tp.main(args, str(checkpoints["llama"]), ENGINE) == 0
    out = capsys.readouterr().out
    assert "tp 1:" in out and "tp 2:" in out and "per step" in out
