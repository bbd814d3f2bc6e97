"""LoRA adapters in the engine: greedy output under each adapter against Hugging Face with the
PEFT adapter merged into the base (float32, token for token), batches mixing adapters and the
base, more adapters than device slots, the prefix cache kept apart per adapter, config errors."""

import json
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from kvserve.cluster.cli import main
from kvserve.workers.engine.block_hash import hash_block_chain
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.kv_events import BlockRemoved, BlockStored
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM

ARCHS = ["llama", "qwen2"]
MAX_TOKENS = 6
NEAR_TIE = 1e-4
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> LoraConfig fields
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all-rslora": dict(r=8, lora_alpha=4, target_modules=ALL_TARGETS, use_rslora=True),
    "qv": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
}


def save_adapter(base_dir, out_dir, seed: int, **fields) -> str:
    """A PEFT adapter of random A and B (not PEFT's zero B) saved with `save_pretrained`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **fields)).save_pretrained(out_dir)
    return str(out_dir)


def save_adapters(base_dir, root) -> dict[str, str]:
    """Every adapter of ADAPTERS for the checkpoint in `base_dir`, saved under `root`: name -> folder."""
    return {name: save_adapter(base_dir, root / name, seed, **fields)
            for seed, (name, fields) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def adapters(tiny_checkpoints, tmp_path_factory) -> dict[str, dict[str, str]]:
    """arch -> adapter name -> folder."""
    root = tmp_path_factory.mktemp("lora")
    return {arch: save_adapters(tiny_checkpoints[arch], root / arch) for arch in ARCHS}


class MergedReference:
    """Greedy continuations from transformers, of the base or of the base with an adapter merged."""

    def __init__(self, base_dir, adapter_dirs: dict[str, str]):
        self.base_dir, self.adapter_dirs = base_dir, adapter_dirs
        self.models: dict[str | None, torch.nn.Module] = {}
        self.config = GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None)

    def model(self, lora: str | None):
        if lora not in self.models:
            model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)
            if lora is not None:
                model = PeftModel.from_pretrained(model, self.adapter_dirs[lora]).merge_and_unload()
            self.models[lora] = model.eval()
        return self.models[lora]

    @torch.inference_mode()
    def generate(self, prompt: list[int], lora: str | None) -> tuple[list[int], torch.Tensor]:
        out = self.model(lora).generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=self.config, output_logits=True, return_dict_in_generate=True,
        )
        return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits)


@pytest.fixture(scope="module")
def references(tiny_checkpoints, adapters):
    return {arch: MergedReference(tiny_checkpoints[arch], adapters[arch]) for arch in ARCHS}


def assert_matches_reference(reference: MergedReference, prompt, lora, got: list[int]) -> None:
    expected, logits = reference.generate(prompt, lora)
    assert len(got) == MAX_TOKENS
    for step, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            top2 = logits[step].topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap < NEAR_TIE, f"{lora}: token {step} differs ({a} vs HF {b}), HF's top-2 gap {gap}"
            return  # after a legitimate near-tie the continuations may part ways


def engine(model_dir, lora_modules: dict[str, str], **options) -> LLM:
    options = {"max_loras": 2, "max_lora_rank": 8, "num_kv_blocks": 64, "block_size": 8, **options}
    return LLM(str(model_dir), device="cpu", dtype="float32", enable_lora=True, lora_modules=lora_modules, **options)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(5, 30))] for _ in range(count)]


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def tokens_of(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_batch_mixing_adapters_and_the_base_matches_hf_merged(arch, tiny_checkpoints, adapters, references):
    names = [None, *ADAPTERS]
    batch_prompts = prompts(2 * len(names))
    loras = names * 2
    llm = engine(tiny_checkpoints[arch], adapters[arch], max_loras=len(ADAPTERS))

    mixed = tokens_of(llm.generate(batch_prompts, greedy(), lora=loras))

    for prompt, lora, got in zip(batch_prompts, loras, mixed):
        assert_matches_reference(references[arch], prompt, lora, got)
    alone = [tokens_of(llm.generate(prompt, greedy(), lora=lora))[0] for prompt, lora in zip(batch_prompts, loras)]
    assert alone == mixed


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_more_adapters_in_flight_than_slots_swap_them(async_scheduling, tiny_checkpoints, adapters, references):
    batch_prompts = prompts(8, seed=1)
    loras = [*ADAPTERS, None, *ADAPTERS][: len(batch_prompts)]
    llm = engine(tiny_checkpoints["llama"], adapters["llama"], max_loras=1, max_cpu_loras=2,
                 async_scheduling=async_scheduling)

    got = tokens_of(llm.generate(batch_prompts, greedy(), lora=loras))

    for prompt, lora, tokens in zip(batch_prompts, loras, got):
        assert_matches_reference(references["llama"], prompt, lora, tokens)
    assert llm.engine.runner.lora_slots.num_slot_loads >= len(ADAPTERS)


def test_base_output_is_unchanged_by_loaded_adapters(tiny_checkpoints, adapters):
    batch_prompts = prompts(3, seed=2)
    plain = LLM(str(tiny_checkpoints["qwen2"]), device="cpu", dtype="float32", num_kv_blocks=64, block_size=8)
    with_adapters = engine(tiny_checkpoints["qwen2"], adapters["qwen2"])
    with_adapters.generate(batch_prompts, greedy(), lora="attn")  # the slots hold an adapter now

    assert tokens_of(with_adapters.generate(batch_prompts, greedy())) == tokens_of(plain.generate(batch_prompts, greedy()))


def test_cached_kv_never_crosses_adapters(tiny_checkpoints, adapters):
    llm = engine(tiny_checkpoints["llama"], adapters["llama"])
    prompt = prompts(1, seed=3)[0] + list(range(10, 30))  # several full blocks of 8

    def cached_tokens(lora):
        return llm.generate(prompt, greedy(), lora=lora)[0].num_cached_tokens

    assert [cached_tokens(lora) for lora in (None, "attn", "mlp")] == [0, 0, 0]
    assert cached_tokens("attn") > 0 and cached_tokens(None) > 0
    chains = [hash_block_chain(prompt, 8, lora_name=lora) for lora in (None, "attn", "mlp")]
    assert not set(chains[0]) & set(chains[1]) and not set(chains[1]) & set(chains[2])


def test_kv_events_name_the_adapter(tiny_checkpoints, adapters):
    llm = engine(tiny_checkpoints["llama"], adapters["llama"])
    llm.engine.take_kv_events()
    llm.generate(prompts(1, seed=4)[0] + list(range(10, 30)), greedy(), lora="mlp")
    stored = [e for e in llm.engine.take_kv_events().events if isinstance(e, BlockStored)]
    assert stored and {e.lora_name for e in stored} == {"mlp"}


def test_stats_name_the_adapters_in_device_slots(tiny_checkpoints, adapters):
    llm = engine(tiny_checkpoints["llama"], adapters["llama"], max_loras=1)
    prompt = prompts(1, seed=7)[0]
    assert llm.engine.stats().lora_adapters == ()
    llm.generate(prompt, greedy(), lora="mlp")
    assert llm.engine.stats().lora_adapters == ("mlp",)
    llm.generate(prompt, greedy(), lora="attn")
    assert llm.engine.stats().lora_adapters == ("attn",)


def test_adapters_are_added_and_removed_at_run_time(tiny_checkpoints, adapters, references):
    llm = engine(tiny_checkpoints["llama"], {})
    prompt = prompts(1, seed=5)[0]
    llm.engine.add_lora("late", adapters["llama"]["qv"])
    assert_matches_reference(references["llama"], prompt, "qv", tokens_of(llm.generate(prompt, greedy(), lora="late"))[0])

    llm.engine.add_request("r", prompt, greedy(), lora_name="late")
    with pytest.raises(ValueError, match="'late' cannot be removed while 1 requests run under it"):
        llm.engine.remove_lora("late")
    llm.engine.abort_request("r")
    llm.engine.remove_lora("late")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'late'"):
        llm.generate(prompt, greedy(), lora="late")
    with pytest.raises(ValueError, match="rank 16 exceeds max_lora_rank 8"):
        big = save_adapter(tiny_checkpoints["llama"], adapters["llama"]["qv"] + "-big", 0, r=16, target_modules=["q_proj"])
        llm.engine.add_lora("big", big)


def test_an_adapter_served_again_from_other_weights_finds_none_of_its_old_kv(tiny_checkpoints, adapters, references):
    llm = engine(tiny_checkpoints["llama"], {})
    prompt = prompts(1, seed=6)[0] + list(range(10, 30))  # several full blocks of 8
    llm.engine.add_lora("name", adapters["llama"]["qv"])
    llm.generate(prompt, greedy(), lora="name")
    assert llm.generate(prompt, greedy(), lora="name")[0].num_cached_tokens > 0
    llm.engine.take_kv_events()

    llm.engine.remove_lora("name")
    removed = [e for e in llm.engine.take_kv_events().events if isinstance(e, BlockRemoved)]
    llm.engine.add_lora("name", adapters["llama"]["mlp"])
    again = llm.generate(prompt, greedy(), lora="name")[0]

    assert removed and again.num_cached_tokens == 0
    assert_matches_reference(references["llama"], prompt, "mlp", again.outputs[0].token_ids)


def test_cli_generates_under_an_adapter(tiny_checkpoints, adapters, references, capsys):
    model, folder = str(tiny_checkpoints["llama"]), adapters["llama"]["all-rslora"]
    code = main(["generate", "--model", model, "--device", "cpu", "--dtype", "float32", "--enable-lora",
                 "--lora-modules", f"tuned={folder}", "--lora", "tuned", "--prompt", "The cat watches",
                 "--max-tokens", str(MAX_TOKENS), "--json"])

    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prompt = AutoTokenizer.from_pretrained(model).encode("The cat watches")
    assert_matches_reference(references["llama"], prompt, "all-rslora", record["token_ids"])


def test_an_unknown_adapter_name_is_refused(tiny_checkpoints, adapters):
    llm = engine(tiny_checkpoints["llama"], {"attn": adapters["llama"]["attn"]})
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'; lora_modules has attn"):
        llm.generate([1, 2, 3], greedy(), lora="nope")
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lora_modules": {"a": "/x"}}, "lora_modules needs enable_lora"),
        ({"enable_lora": True, "speculative": {"method": "draft", "model": "d", "num_speculative_tokens": 2}},
         "enable_lora does not work with speculative method 'draft'"),
        ({"enable_lora": True, "max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras 2 is below max_loras 4"),
    ],
)
def test_engine_config_refuses_lora_settings_that_cannot_work(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **options)


def rewrite_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "fields, edit, message",
    [
        (dict(r=16, target_modules=["q_proj"]), None, "lora_modules.bad: rank 16 exceeds max_lora_rank 8"),
        (dict(r=2, target_modules=["q_proj", "lm_head"]), None, "lora_modules.bad: target modules lm_head are not"),
        (dict(r=2, target_modules=["q_proj"]), {"use_dora": True}, "lora_modules.bad: use_dora True is not supported"),
        (dict(r=2, target_modules=["q_proj"]), "missing", "lora_modules.bad: .* has no adapter_config.json"),
    ],
)
def test_bad_adapters_stop_the_engine_naming_the_key(fields, edit, message, tiny_checkpoints, tmp_path):
    folder = tmp_path / "adapter"
    save_adapter(tiny_checkpoints["llama"], folder, 0, **fields)
    if edit == "missing":
        folder = tmp_path / "nowhere"
    elif edit:
        rewrite_config(folder, **edit)
    with pytest.raises(ValueError, match=message):
        engine(tiny_checkpoints["llama"], {"bad": str(folder)})
