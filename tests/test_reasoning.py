"""Telling a reasoning model's thinking from its answer, streamed however the text is cut."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvserve.router.reasoning import CLOSE, OPEN, PARSERS, ReasoningSplitter, Split, ThinkingTokens, thinking_start

# Text made of the tags, pieces of them and a little else, so that cuts fall inside tags.
pieces = st.lists(st.sampled_from([OPEN, CLOSE, "<", "</", "<th", "</think", "think>", ">", " ", "\n", "a", "bc"]),
                  max_size=12).map("".join)


def split_all(parser: str, text: str) -> Split:
    """A whole output's thinking and answer, fed in one piece."""
    return ReasoningSplitter(parser).feed(text, last=True)


def reference(parser: str, text: str) -> Split:
    """The rule in one piece: a leading <think> (after blanks) opens the thinking, which
    DeepSeek-R1's output is in from the start; the first </think> closes it."""
    thinking = parser == "deepseek_r1"
    if text.lstrip().startswith(OPEN):
        text, thinking = text.lstrip()[len(OPEN):], True
    if not thinking:
        return Split("", text)
    reasoning, closed, answer = text.partition(CLOSE)
    return Split(reasoning, answer if closed else "")


@given(parser=st.sampled_from(PARSERS), text=pieces, cuts=st.lists(st.integers(0, 60), max_size=8))
def test_streamed_pieces_add_up_to_the_whole_split(parser, text, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    splitter, reasoning, answer = ReasoningSplitter(parser), "", ""
    for k, (start, end) in enumerate(zip(bounds, bounds[1:] or [len(text)])):
        part = splitter.feed(text[start:end], last=k == max(len(bounds) - 2, 0))
        reasoning, answer = reasoning + part.reasoning, answer + part.content
    assert Split(reasoning, answer) == split_all(parser, text) == reference(parser, text)


@pytest.mark.parametrize("parser", PARSERS)
def test_a_prompt_ending_in_a_tag_says_how_the_output_starts(parser):
    closed = ReasoningSplitter(parser, "<|assistant|>\n<think>\n\n</think>\n\n").feed("Paris.", last=True)
    assert (closed.reasoning, closed.content) == ("", "Paris.")
    opened = ReasoningSplitter(parser, "<|assistant|>\n<think>\n").feed("Hmm.</think>Paris.", last=True)
    assert (opened.reasoning, opened.content) == ("Hmm.", "Paris.")
    plain = ReasoningSplitter(parser, "<|assistant|>\n").feed("Hmm.</think>Paris.", last=True)
    assert plain == ReasoningSplitter(parser).feed("Hmm.</think>Paris.", last=True)


def test_how_the_output_starts_follows_the_prompts_tag_else_the_parser():
    for parser in PARSERS:
        assert thinking_start(parser, "<|assistant|>\n<think>\n") is True
        assert thinking_start(parser, "<|assistant|>\n<think>\n\n</think>\n\n") is False
    assert thinking_start("deepseek_r1", "<|assistant|>\n") is True
    assert thinking_start("qwen3", "<|assistant|>\n") is None  # it opens the thinking, or skips it


# Tokens whose texts are the two tags and single letters, blank or not: the thinking's text has
# one letter per token.
TOKEN_TEXTS = {0: OPEN, 1: CLOSE, 2: "a", 3: "b", 4: " ", 5: "\n"}
PROMPTS = ["<|assistant|>\n", "<|assistant|>\n<think>\n", "<|assistant|>\n<think>\n\n</think>\n\n"]


@given(parser=st.sampled_from(PARSERS), prompt=st.sampled_from(PROMPTS),
       tokens=st.lists(st.sampled_from(list(TOKEN_TEXTS)), max_size=10), cuts=st.lists(st.integers(0, 10), max_size=4))
def test_the_thinking_tokens_counted_by_id_are_those_of_the_split_text(parser, prompt, tokens, cuts):
    """However the tokens arrive, their count is the letters of the thinking the text splitter
    finds in their text (a prompt's closing tag, an opening tag after blanks or none, a closing
    tag, an output of blanks alike)."""
    counter, counted = ThinkingTokens(parser, prompt, 0, 1, TOKEN_TEXTS.__getitem__), 0
    bounds = sorted({min(c, len(tokens)) for c in cuts} | {0, len(tokens)})
    for start, end in zip(bounds, bounds[1:]):
        counted += counter.feed(tokens[start:end], last=end == len(tokens))
    counted += counter.feed([], last=True)  # the end may come after the last token
    text = "".join(TOKEN_TEXTS[t] for t in tokens)
    thinking = ReasoningSplitter(parser, prompt).feed(text, last=True).reasoning
    assert counted == counter.count == len(thinking.replace(OPEN, "x"))  # one letter, or a tag, per token
