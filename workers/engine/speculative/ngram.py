"""Prompt lookup: the proposal for a sequence is what followed the latest earlier occurrence of
its last few tokens, in its own prompt and output. No model runs."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, num_tokens: int, min_ngram: int, max_ngram: int):
        self.num_tokens = num_tokens
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to `min(limit, num_tokens)` tokens to follow `token_ids`; the longest n-gram
        (from max_ngram down to min_ngram) that ends the sequence and occurred before wins.
        Empty when none occurred."""
        limit = min(limit, self.num_tokens)
        if limit <= 0 or len(token_ids) <= self.min_ngram:
            return []
        tokens = np.asarray(token_ids)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            start = _latest_earlier_occurrence(tokens, n)
            if start is not None:
                return tokens[start + n : start + n + limit].tolist()
        return []


def _latest_earlier_occurrence(tokens: np.ndarray, n: int) -> int | None:
    """Where the latest occurrence of the last `n` tokens starts, among those followed by at
    least one token (so not the suffix itself)."""
    windows = sliding_window_view(tokens[:-1], n)
    matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
    return int(matches[-1]) if len(matches) else None
