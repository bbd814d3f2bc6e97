"""Incremental detokenization and stop strings, per sequence."""

from tokenizers.decoders import DecodeStream

_REPLACEMENT = "\ufffd"  # what a decoder makes of bytes that are not (yet) a whole character
_CONTEXT_TOKENS = 4
_MAX_CONTEXT_TOKENS = 16


class IncrementalDetokenizer:
    """Text of each new token as soon as it forms whole characters: a character whose UTF-8
    bytes span several byte-level tokens comes out once, complete, never as U+FFFD.

    `tokenizer` is a fast (Rust-backed) Hugging Face tokenizer."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._backend = tokenizer.backend_tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # The prompt's tail gives the first output token its context (a leading space, say).
        self._token_ids = self._context(prompt_token_ids)
        primed = "".join(filter(None, (self._stream.step(self._backend, t) for t in self._token_ids)))
        self._output_start = len(self._decode(self._token_ids).rstrip(_REPLACEMENT))
        # A prompt that ends inside a character leaves the stream holding back the text since its
        # last whole character: its first output would repeat what the prompt already shows.
        self._repeated = self._output_start - len(primed)
        self._num_emitted = 0  # characters of output text handed out so far

    def step(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        text = self._stream.step(self._backend, token_id)
        if not text:
            return ""
        if self._repeated:
            text, self._repeated = text[self._repeated :], 0
        self._num_emitted += len(text)
        return text

    def flush(self) -> str:
        """At the end of the sequence, the text still held back: the stream holds everything
        after a token that ends inside a character, whole characters included. Only a trailing
        incomplete character is dropped."""
        text = self._decode(self._token_ids)[self._output_start :].rstrip(_REPLACEMENT)
        rest = text[self._num_emitted :]
        self._num_emitted += len(rest)
        return rest

    def _context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last few prompt tokens, from a character boundary on: a tail that started
        inside a character would decode to U+FFFD first, and the stream would emit it."""
        num_prompt = len(prompt_token_ids)
        longest = min(_MAX_CONTEXT_TOKENS, num_prompt)
        for length in range(min(_CONTEXT_TOKENS, num_prompt), longest + 1):
            tail = prompt_token_ids[num_prompt - length :]
            if not self._decode(tail).startswith(_REPLACEMENT):
                return tail
        # No boundary within reach (a prompt given as ids may start inside a character).
        return prompt_token_ids[num_prompt - longest :]

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


class StopStringMatcher:
    """Cuts the output at the first stop string to complete (the longest of those completing
    at the same character). Text that could still turn out to be the start of a stop string
    is held back until it cannot, so no part of a stop string is emitted unless asked for."""

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False):
        self._stops = list(stops)
        self._include = include_stop_str_in_output
        self._longest = max(map(len, self._stops), default=0)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool, str | None]:
        """The new text of one step -> (text to emit now, whether a stop string ended the
        output, which one)."""
        if not self._stops:
            return text, False, None
        pending = self._held + text
        hit = self._first_completed(pending)
        if hit is not None:
            start, stop = hit
            self._held = ""
            return pending[: start + len(stop) if self._include else start], True, stop
        held = self._partial_stop_length(pending)
        self._held = pending[len(pending) - held :]
        return pending[: len(pending) - held], False, None

    def flush(self) -> str:
        """The held-back text, for a sequence that ends for another reason."""
        held, self._held = self._held, ""
        return held

    def _first_completed(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence in `text` that ends first, if any."""
        found = [
            (at + len(stop), -len(stop), at, stop) for stop in self._stops if (at := text.find(stop)) >= 0
        ]
        if not found:
            return None
        _, _, start, stop = min(found)
        return start, stop

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
