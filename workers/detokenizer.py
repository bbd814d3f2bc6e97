"""Incremental detokenization and stop strings, per sequence."""

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Text of each new token as soon as it forms whole characters: a character whose UTF-8
    bytes span several byte-level tokens comes out once, complete, never as U+FFFD."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # The prompt's tail gives the first output token its context (a leading space).
        for token_id in prompt_token_ids[-4:]:
            self._stream.step(self._backend, token_id)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


class StopStringMatcher:
    """Cuts the output at the first stop string. Text that could still turn out to be the
    start of a stop string is held back until it cannot, so no partial stop string is ever
    emitted."""

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False):
        self.stops = stops
        self.include = include_stop_str_in_output
        self._held = ""
        self._longest = max((len(s) for s in stops), default=0)

    def feed(self, text: str) -> tuple[str, bool, str | None]:
        """(text to emit now, whether a stop string ended the output, which one)."""
        if not self.stops:
            return text, False, None
        pending = self._held + text
        hit = self._first_stop(pending)
        if hit is not None:
            at, stop = hit
            self._held = ""
            return pending[: at + len(stop)] if self.include else pending[:at], True, stop
        keep = self._undecided_suffix(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False, None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        found = [(text.find(s), s) for s in self.stops]
        found = [(at, s) for at, s in found if at >= 0]
        return min(found, key=lambda f: f[0]) if found else None

    def _undecided_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stops):
                return length
        return 0
