"""Tiny random-weight Hugging Face checkpoints, built locally: the test models and the CLI's
default model. Nothing is ever downloaded."""

import itertools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
THINK_TAGS = ("<think>", "</think>")  # one token each, kept in decoded text, as in Qwen3's and DeepSeek-R1's vocabularies
VOCAB_SIZE = 512
# With `enable_thinking` false (a chat_template_kwargs variable) the answer opens with an empty
# thinking block, as Qwen3's template has it; a `reasoning_effort` is stated first, as gpt-oss's has it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if reasoning_effort is defined %}<|system|>\nReasoning: {{ reasoning_effort }}{{ eos_token }}\n"
    "{% endif %}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
MARKER = "kvserve_tiny_spec.json"
SPEC_VERSION = 3  # bump when the built checkpoints change, so that old ones are rebuilt
SEED = 1234

_SUBJECTS = ["The cat", "A small robot", "My neighbour", "The old library", "Every engineer",
             "The river", "Our team", "A curious child", "The server", "This recipe"]
_VERBS = ["watches", "builds", "remembers", "carries", "explains",
          "paints", "repairs", "counts", "follows", "writes"]
_OBJECTS = ["the morning light", "a paper boat", "seven blue stones", "the quiet harbour",
            "a long letter", "the broken clock", "300 requests", "a map of the stars",
            "the winter garden", "an unfinished song"]
_ENDINGS = ["before breakfast.", "with great care.", "every Sunday.", "while it rains.",
            "in the kitchen.", "without a word?", "near the station!", "at 10:45 pm.",
            "for 12 minutes.", "and then sleeps."]
_MULTILINGUAL = [
    "Café crème, crêpes et crème brûlée à la française.",
    "Über den Wolken muss die Freiheit grenzenlos sein.",
    "El niño comió jalapeños y piñas por la mañana.",
    "Ångström, façade, naïve, coöperate, résumé, smörgåsbord.",
    "Привет, мир! Как у тебя дела сегодня?",
    "Καλημέρα κόσμε, τι κάνεις;",
    "東京は日本の首都です。今日はいい天気ですね。",
    "我喜欢学习新的语言。你好，世界！",
    "안녕하세요, 세계! 만나서 반갑습니다.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Emoji: 🙂 🚀 🎉 ❤️ 👍🏽 🇫🇷 🐍 ☕",
    "Math: ∑ x² ≤ ∞, π ≈ 3.14159, α + β = γ.",
    "Prices: €20, £15, ¥300, ₹99, ₩1000.",
]


def _corpus() -> list[str]:
    """About 450 lines: varied English sentences and multi-byte text in several scripts."""
    sentences = itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
    english = [" ".join(words) for words in itertools.islice(sentences, 0, None, 29)]
    return english + _MULTILINGUAL * 7


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (deterministically) and saves it to `out_dir`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(THINK_TAGS),
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in THINK_TAGS])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_tiny_checkpoint(out_dir: str | Path, arch: str = "llama", **overrides) -> Path:
    """A tiny `arch` checkpoint with its tokenizer in `out_dir`, kept if already built to the
    same spec. `overrides` are config fields, plus `max_shard_size` to shard the weights."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(CONFIGS)}")
    out_dir = Path(out_dir)
    # Through JSON, so that it compares equal to the marker read back (tuples become lists).
    spec = json.loads(json.dumps({"version": SPEC_VERSION, "arch": arch, "overrides": overrides}))
    if _built_spec(out_dir) == spec:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _write_checkpoint(staging, arch, dict(overrides))
        (staging / MARKER).write_text(json.dumps(spec))
        _replace(out_dir, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _built_spec(out_dir: Path) -> dict | None:
    marker = out_dir / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def _replace(out_dir: Path, staging: Path) -> None:
    """Moves the finished build into place, so that a reader never sees half a checkpoint."""
    if out_dir.exists():
        if _built_spec(out_dir) is None and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} holds files that are not a tiny checkpoint; not replacing it")
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def _write_checkpoint(out_dir: Path, arch: str, overrides: dict) -> None:
    tokenizer = build_tokenizer(out_dir)
    max_shard_size = overrides.pop("max_shard_size", "1GB")
    fields = dict(
        architectures=[ARCHITECTURES[arch]],
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        # Wide weights give peaked logits, so greedy decoding has clear winners, not near-ties.
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "mistral":
        fields["sliding_window"] = None
    config = CONFIGS[arch](**{**fields, **overrides})
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_norms_and_biases(model)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)


@torch.no_grad()
def _perturb_norms_and_biases(model: torch.nn.Module) -> None:
    """Norm weights start at one and biases at zero; make them random too, so that loading
    them into the wrong place shows."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.normal_(mean=1.0, std=0.1)
        elif name.endswith(".bias"):
            param.normal_(mean=0.0, std=0.1)
