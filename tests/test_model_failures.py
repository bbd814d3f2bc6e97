"""A model that breaks numerically on some inputs (here: NaN in one token's embedding row, so
any sequence holding that token gets NaN logits) fails those requests alone, with an error
that says so; the rest of the batch gets exactly what it gets without them, and no block leaks."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM
from kvserve.workers.runner import start_engine
from kvserve.workers.runner.sampler import Sampler, SamplingRow

POISON = 7  # the token whose embedding is NaN
AVOID_POISON = {POISON: -100.0}  # so that a healthy request never generates it
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def poisoned(tiny_checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(tiny_checkpoints["llama"], folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][POISON] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _healthy_requests() -> list[tuple[list[int], SamplingParams]]:
    return [
        ([11, 12, 13, 14, 15, 16, 17, 18, 19], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True,
                                                             logit_bias=AVOID_POISON, logprobs=2)),
        ([30, 31, 32, 30, 31, 32, 30, 31], SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12,
                                                          ignore_eos=True, logit_bias=AVOID_POISON)),
        ([40, 41, 42], SamplingParams(n=2, temperature=1.0, top_k=20, seed=5, max_tokens=10, ignore_eos=True,
                                      logit_bias=AVOID_POISON)),
    ]


def _broken_requests() -> list[tuple[list[int], SamplingParams]]:
    return [
        ([11, 12, POISON, 14], SamplingParams(temperature=0, max_tokens=8)),  # greedy
        ([50, POISON], SamplingParams(n=2, temperature=1.0, top_p=0.5, min_p=0.1, seed=1, max_tokens=8)),  # drawn
    ]


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> tuple[dict, dict]:
    """Every request to its end: the token ids of each sample, and the failures reported."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    tokens, failures = {}, {}
    while engine.has_unfinished_requests():
        for new in engine.step_tokens():
            tokens.setdefault((new.request_id, new.sample_index), []).append(new.token_id)
        failures.update(engine.take_failures())
    return tokens, failures


@pytest.mark.parametrize("options", [
    pytest.param({}, id="sync"),
    pytest.param({"async_scheduling": "on"}, id="async"),
    pytest.param({"speculative": NGRAM}, id="ngram"),
    pytest.param({"num_kv_blocks": 14, "block_size": 4, "max_model_len": 48}, id="preempting-pool"),
])
def test_requests_with_nan_logits_fail_alone(poisoned, options):
    _check_they_fail_alone({"model": str(poisoned), "device": "cpu", "num_kv_blocks": 64, "max_model_len": 128,
                            **options})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_requests_with_nan_logits_fail_alone(poisoned):
    """The device path: the sampler's unconditional zeroing, async scheduling, the Triton
    kernels' masked reads of blocks a failed request left NaN in."""
    _check_they_fail_alone({"model": str(poisoned), "device": "cuda", "dtype": "float32", "num_kv_blocks": 64,
                            "max_model_len": 128})


def _check_they_fail_alone(config: dict) -> None:
    healthy = {f"ok-{i}": r for i, r in enumerate(_healthy_requests())}
    broken = {f"bad-{i}": r for i, r in enumerate(_broken_requests())}
    engine = start_engine(EngineConfig(**config))
    alone, no_failures = _run(engine, healthy)
    assert no_failures == {}
    mixed = dict(broken)
    mixed.update(healthy)  # the broken ones ahead in the queue: they share the healthy ones' steps
    tokens, failures = _run(engine, mixed)

    assert set(failures) == set(broken)
    for reason in failures.values():
        assert "NaN or no finite value" in reason and "output token 1 " in reason
    assert {key: value for key, value in tokens.items() if key[0] in healthy} == alone
    assert not any(key[0] in broken for key in tokens)
    stats = engine.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0
    assert (stats.num_preemptions > 0) == (config["num_kv_blocks"] < 64)


def test_a_draft_models_verification_of_nan_logits_fails_that_request_alone(poisoned, tiny_checkpoints):
    draft = {"method": "draft", "model": str(tiny_checkpoints["llama"]), "num_speculative_tokens": 3}
    engine = start_engine(EngineConfig(model=str(poisoned), device="cpu", num_kv_blocks=64, max_model_len=128,
                                       speculative=draft))
    healthy = {"ok": _healthy_requests()[0]}
    alone, _ = _run(engine, healthy)
    tokens, failures = _run(engine, {"bad": _broken_requests()[0], **healthy})
    assert set(failures) == {"bad"} and tokens == alone


def test_offline_generate_names_the_failed_request_and_leaves_nothing_behind(poisoned):
    llm = LLM(str(poisoned), device="cpu", num_kv_blocks=64, max_model_len=128)
    prompt, params = _healthy_requests()[0]
    with pytest.raises(RuntimeError, match=r"request 'offline-1' failed: the model's logits .* NaN"):
        llm.generate([prompt, _broken_requests()[0][0]], [params, SamplingParams(max_tokens=4)])
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().kv_blocks_used == 0
    assert len(llm.generate([prompt], params)[0].outputs[0].token_ids) == 14


def test_an_embedding_of_nan_hidden_states_fails_alone(poisoned):
    llm = LLM(str(poisoned), device="cpu", num_kv_blocks=64, max_model_len=128)
    healthy = [[11, 12, 13], [20, 21, 22, 23]]
    alone = [e.embedding for e in llm.embed(healthy)]
    with pytest.raises(RuntimeError, match=r"request 'offline-3' failed: .* NaN or infinite values"):
        llm.embed([healthy[0], [5, POISON, 9]])
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().kv_blocks_used == 0
    engine = llm.engine
    engine.add_embedding_request("bad", [5, POISON, 9])
    for i, prompt in enumerate(healthy):
        engine.add_embedding_request(f"ok-{i}", prompt)
    embeddings, failures = {}, {}
    while engine.has_unfinished_requests():
        engine.step_tokens()
        embeddings.update((e.request_id, e.embedding) for e in engine.take_embeddings())
        failures.update(engine.take_failures())
    assert set(failures) == {"bad"} and set(embeddings) == {"ok-0", "ok-1"}
    for i, vector in enumerate(alone):  # batched differently: equal up to rounding
        torch.testing.assert_close(torch.tensor(embeddings[f"ok-{i}"]), torch.tensor(vector), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("broken_row", [
    pytest.param(lambda row: row.fill_(float("nan")), id="nan"),
    pytest.param(lambda row: row.fill_(float("-inf")), id="all-minus-inf"),
    pytest.param(lambda row: row.__setitem__(3, float("inf")), id="plus-inf"),
])
def test_the_sampler_marks_a_row_with_nothing_to_draw_and_draws_the_others_as_without_it(broken_row):
    vocab = 300
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.0, top_p=0.8, seed=2), SamplingParams(temperature=1.0, top_k=5, seed=3),
              SamplingParams(temperature=1.0, min_p=0.2, seed=4)]
    rows = [SamplingRow(p, [1, 2, 3], 3, seed=p.seed) for p in params]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(0)) * 3
    clean = Sampler()(logits.clone(), rows)
    for broken in range(len(rows)):
        damaged = logits.clone()
        broken_row(damaged[broken])
        out = Sampler()(damaged, rows)
        expected = [-2 if i == broken else token for i, token in enumerate(clean.token_ids)]
        assert out.token_ids == expected
