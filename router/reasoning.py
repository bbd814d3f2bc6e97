"""A reasoning model's thinking, told apart from its answer (`serving.reasoning_parser`).

Qwen3 and DeepSeek-R1 think between `<think>` and `</think>` before they answer. The chat
response carries the thinking as `reasoning_content` (DeepSeek's API, vLLM's name) and only
the answer as `content`. The two parsers differ in where the output starts: DeepSeek-R1's
chat template opens the thinking in the prompt, so its output starts inside it; Qwen3's output
opens it itself, or does not think at all (`enable_thinking` false), and then is all answer.
A `<think>` the output starts with is dropped either way.

`ReasoningSplitter` takes the text as it streams and hands back what is certain so far: a tag
cut across two deltas is held back until the next delta shows whether it is one.
"""

from collections.abc import Callable
from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1")


@dataclass(frozen=True, slots=True)
class Split:
    reasoning: str
    content: str


def thinking_start(parser: str, prompt: str) -> bool | None:
    """How the output after `prompt` begins: inside the thinking (True: the prompt opened it, or
    DeepSeek-R1's rule), with the answer (False: the prompt closed an empty thinking, Qwen3's
    template with `enable_thinking` false), or either (None, Qwen3's rule: its output opens the
    thinking itself, or skips it)."""
    text = prompt.rstrip()
    if text.endswith(OPEN):
        return True
    if text.endswith(CLOSE):
        return False
    return True if parser == "deepseek_r1" else None


class ReasoningSplitter:
    def __init__(self, parser: str, prompt: str = ""):
        """`prompt`: the text the output follows, which with the parser says how the output
        starts (`thinking_start`); where it may start either way, a `<think>` opening it says."""
        if parser not in PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}; choose one of {', '.join(PARSERS)}")
        self.thinking = thinking_start(parser, prompt) is True
        self.at_start = True  # nothing of the output handed back yet: a <think> may open it
        self.held = ""

    def feed(self, text: str, last: bool = False) -> Split:
        """The thinking and the answer certain once `text` has come after what came before;
        everything, held back or not, if it is the `last` of the output."""
        split = self._feed(text)
        if not last:
            return split
        rest = self._rest()
        return Split(split.reasoning + rest.reasoning, split.content + rest.content)

    def _feed(self, text: str) -> Split:
        held = self.held + text
        if self.at_start:
            if OPEN.startswith(held.lstrip()) and len(held.lstrip()) < len(OPEN):
                self.held = held  # could still be the opening tag
                return Split("", "")
            self.at_start = False
            if held.lstrip().startswith(OPEN):
                held, self.thinking = held.lstrip()[len(OPEN):], True
        if not self.thinking:
            self.held = ""
            return Split("", held)
        end = held.find(CLOSE)
        if end >= 0:
            self.thinking, self.held = False, ""
            return Split(held[:end], held[end + len(CLOSE):])
        keep = _partial_tag_at_end(held)
        self.held = held[len(held) - keep:] if keep else ""
        return Split(held[: len(held) - keep], "")

    def _rest(self) -> Split:
        """What is still held back, at the end of the output."""
        held, self.held = self.held, ""
        return Split(held, "") if self.thinking else Split("", held)


class ThinkingTokens:
    """How many of a sample's output tokens are its thinking, counted by the tags' token ids
    (where the vocabulary has both whole), by `ReasoningSplitter`'s rule: the tokens after an
    opening tag that starts the output (blank tokens before it dropped), or from the start
    where the output starts inside the thinking, up to the closing tag; the tags themselves
    not counted. `token_text` gives a token's text, to tell the blank ones."""

    def __init__(self, parser: str, prompt: str, open_id: int, close_id: int, token_text: Callable[[int], str]):
        self.starts_thinking = thinking_start(parser, prompt) is True
        self.open_id, self.close_id, self.token_text = open_id, close_id, token_text
        self.thinking: bool | None = None  # None: no token yet but blank ones
        self.leading_blanks = 0  # thinking where the output starts inside it, unless a tag follows
        self.count = 0

    def feed(self, token_ids: list[int], last: bool = False) -> int:
        """Take the sample's next tokens (its `last`, if so); returns how many more of its
        tokens are thinking."""
        before = self.count
        for token in token_ids:
            if self.thinking is None:
                if token == self.open_id:
                    self.thinking = True
                    continue
                if not self.token_text(token).strip():
                    self.leading_blanks += 1
                    continue
                self._begin()
            if not self.thinking:
                break
            if token == self.close_id:
                self.thinking = False
                break
            self.count += 1
        if last and self.thinking is None:
            self._begin()
        return self.count - before

    def _begin(self) -> None:
        """The output starts with something else than the opening tag."""
        self.thinking = self.starts_thinking
        if self.thinking:
            self.count += self.leading_blanks


def _partial_tag_at_end(text: str) -> int:
    """The length of the longest end of `text` that begins `</think>` (0: none)."""
    for size in range(min(len(CLOSE) - 1, len(text)), 0, -1):
        if CLOSE.startswith(text[-size:]):
            return size
    return 0
