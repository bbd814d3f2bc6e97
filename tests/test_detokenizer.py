import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvserve.workers.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

REPLACEMENT = "\ufffd"
CORPUS = [
    "Café au lait, crème brûlée, naïve façade, résumé, Ærøskøbing, Ångström.",
    "日本語のテキストです。中文文本。한국어 텍스트입니다.",
    "Emoji: 😀 🎉 👍🏽 🦓 👨‍👩‍👧 and the flag 🇫🇷.",
    "Plain English text, with spaces and punctuation: hello world!",
]
TEXTS = [
    "Crème brûlée à la façade, naïve Ångström",
    "日本語のテキスト と 中文文本",
    "emoji 😀🎉 then 👍🏽 and a family 👨‍👩‍👧 🦓",
    "hello world 日本 café 😀!",
    "🐙🦀🐳🦑🐠 no merges for these",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with a vocabulary small enough that rare characters span tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def increments(tokenizer, prompt: list[int], output: list[int], skip_special_tokens=True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    return [detokenizer.step(token_id) for token_id in output]


def test_some_characters_span_several_tokens(tokenizer):
    ids = tokenizer.encode("🦓", add_special_tokens=False)
    assert len(ids) > 1
    assert increments(tokenizer, tokenizer.encode("a", add_special_tokens=False), ids)[-1] == "🦓"
    assert set(increments(tokenizer, [0], ids)[:-1]) == {""}


@pytest.mark.parametrize("text", TEXTS)
def test_increments_add_up_to_the_decoded_output_at_every_prompt_cut(tokenizer, text):
    """Every split of a text's tokens into prompt and output, including splits inside a
    character (a prompt given as token ids): the output's text is what the whole decodes to
    after the prompt's whole characters, and no increment holds a replacement character."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    whole = tokenizer.decode(ids)
    assert REPLACEMENT not in whole
    for cut in range(1, len(ids)):
        prompt_text = tokenizer.decode(ids[:cut]).rstrip(REPLACEMENT)
        parts = increments(tokenizer, ids[:cut], ids[cut:])
        assert "".join(parts) == whole[len(prompt_text) :], cut
        assert not any(REPLACEMENT in part for part in parts), cut


def test_first_output_token_keeps_its_leading_space(tokenizer):
    prompt = tokenizer.encode("<s>hello", add_special_tokens=False)
    output = tokenizer.encode(" world café", add_special_tokens=False)
    assert "".join(increments(tokenizer, prompt, output)) == " world café"


def test_special_tokens_are_skipped_or_kept(tokenizer):
    output = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(increments(tokenizer, [tokenizer.bos_token_id], output)) == "hi"
    assert "".join(increments(tokenizer, [tokenizer.bos_token_id], output, False)) == "hi</s>"


def finished_text(tokenizer, prompt: list[int], output: list[int]) -> str:
    """What a finished sequence hands out: every increment, then the flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    return "".join(detokenizer.step(token_id) for token_id in output) + detokenizer.flush()


def decoded_output(tokenizer, prompt: list[int], output: list[int]) -> str:
    """The tokenizer's own decode of the output, less a trailing incomplete character."""
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=True).rstrip(REPLACEMENT)
    whole = tokenizer.decode(prompt + output, skip_special_tokens=True)
    return whole[len(prompt_text) :].rstrip(REPLACEMENT)


def test_whole_characters_before_an_incomplete_one_reach_the_end(tokenizer):
    """After a stray byte, a token of whole characters plus the first byte of another: the
    stream holds all of it back; the flush gives the whole characters."""
    vocab = tokenizer.get_vocab()
    ends_inside = next(
        t for t in sorted(vocab.values())
        if (text := tokenizer.decode([t])).endswith(REPLACEMENT) and text.rstrip(REPLACEMENT).strip()
    )
    stray = tokenizer.convert_tokens_to_ids("\u0122")  # byte 0x80 in byte-level BPE: never a character start
    prompt = tokenizer.encode("hello", add_special_tokens=False)
    output = [stray] + tokenizer.encode(" 日本", add_special_tokens=False) + [ends_inside]
    expected = decoded_output(tokenizer, prompt, output)
    assert "日本" in expected and expected.endswith(tokenizer.decode([ends_inside]).rstrip(REPLACEMENT))
    assert finished_text(tokenizer, prompt, output) == expected


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_finished_text_is_the_decode_of_its_tokens(tokenizer, data):
    token_ids = st.integers(0, len(tokenizer) - 1)
    prompt = data.draw(st.lists(token_ids, min_size=1, max_size=6))
    output = data.draw(st.lists(token_ids, min_size=1, max_size=12))
    assert finished_text(tokenizer, prompt, output) == decoded_output(tokenizer, prompt, output)


def test_flush_gives_nothing_twice(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [0])
    for token_id in tokenizer.encode("naïve 日本", add_special_tokens=False):
        detokenizer.step(token_id)
    detokenizer.flush()
    assert detokenizer.flush() == ""


def test_ids_outside_the_tokenizer_decode_to_nothing(tokenizer):
    assert increments(tokenizer, [0], [len(tokenizer) + 5]) == [""]


# -- stop strings ------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, chunks: list[str]) -> tuple[list[str], str | None]:
    """Emitted pieces (with the flush when no stop string ended the text) and the stop."""
    emitted = []
    for chunk in chunks:
        text, stopped, stop = matcher.feed(chunk)
        emitted.append(text)
        if stopped:
            return emitted, stop
    return emitted + [matcher.flush()], None


def test_no_stop_strings_pass_text_through():
    assert StopStringMatcher([]).feed("anything") == ("anything", False, None)


def test_stop_string_across_chunks_is_cut():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello ST") == ("hello ", False, None)
    assert matcher.feed("O") == ("", False, None)
    assert matcher.feed("P and more") == ("", True, "STOP")


def test_stop_string_included_when_asked():
    assert feed_all(StopStringMatcher(["</a>"], True), ["x </", "a> y"]) == (["x ", "</a>"], "</a>")


def test_held_text_comes_back_when_it_is_not_a_stop():
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False, None)
    assert matcher.feed("d") == ("abd", False, None)
    assert matcher.feed("ab") == ("", False, None)
    assert matcher.flush() == "ab"


def expected_output(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Character by character: the first stop string to complete ends the text; of those
    completing at the same character, the longest."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


ALPHABET = "ab日😀 "
texts = st.text(alphabet=ALPHABET, max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    text=texts,
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
    include=st.booleans(),
)
def test_stop_strings_are_never_partially_emitted(text, stops, cuts, include):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    expected, expected_stop = expected_output(text, stops, include)
    matcher = StopStringMatcher(stops, include)
    emitted = ""
    for chunk in chunks:
        piece, stopped, stop = matcher.feed(chunk)
        emitted += piece
        # Nothing emitted is ever taken back: what is out is always a prefix of the result.
        assert expected.startswith(emitted)
        if stopped:
            assert (emitted, stop) == (expected, expected_stop)
            return
    assert expected_stop is None
    assert emitted + matcher.flush() == text
